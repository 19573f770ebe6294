"""Reading photos of any common kind as 8-bit RGB, and decoding many of them at once.

Every decoder failure becomes a `BadImage` whose message names the file and the reason,
so callers can skip it, say so, and go on.
"""
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from .cli import InputError, available_cpus, rank

# Pillow's own limit (about 89 megapixels) warns; we refuse at that size instead,
# since a decompression bomb can exhaust memory long before the error threshold.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class BadImage(InputError):
    """A file that cannot be used as an image; str() names the file and the reason."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# How every step prepares a photo (recorded in each checkpoint, and in ONNX exports): what open_rgb,
# resize_square and data.Normalize do.
PREPROCESSING = {
    "decode": "Pillow; EXIF orientation applied; grey, palette, CMYK, 16-bit and float images converted to "
              "8-bit RGB; transparency composited onto white",
    "resize": "the whole photo squeezed to img_size x img_size (aspect ratio not kept, nothing cropped)",
    "interpolation": "bicubic (Pillow Image.resize, reducing_gap=3.0)",
    "normalise": "pixel / 255, then (x - mean) / std per RGB channel; N x 3 x H x W",
}


def open_rgb(path, background=(255, 255, 255)) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB image, upright (EXIF orientation applied).

    Grayscale and palette images are expanded, CMYK is converted, 16-bit and float images
    are scaled (not clipped) to 8 bits, and transparency is composited onto `background`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(path, f"{img.width}x{img.height} pixels is over the "
                                         f"{MAX_PIXELS:,}-pixel safety limit (decompression bomb?)")
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img, background)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(path, f"refused, too many pixels ({e})") from None
    except Image.UnidentifiedImageError:  # (Pillow says this of a zero-byte file too)
        raise BadImage(path, "empty file" if _is_empty(path) else "not an image file (unknown format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        if os.path.islink(path) and not os.path.exists(path):
            reason = f"a symbolic link that leads nowhere (broken, or a loop) ({e})"
        else:
            reason = "empty file" if _is_empty(path) else f"corrupt or unreadable image ({e})"
        raise BadImage(path, reason) from None


def _is_empty(path):
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """The pipeline's one resizing rule: the whole photo, squeezed to size x size."""
    return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)


def decode_many(items, work, desc="decode", ahead=64):
    """Yield (item, work(item)) in the order of `items`, with `work` running on a thread pool.

    At most `ahead` items are decoded in front of the consumer, so memory stays bounded while
    decoding overlaps whatever the consumer does. A BadImage raised by `work` is yielded as the
    result. When the consumer stops early (Ctrl-C, an error), the queued work is cancelled.
    """
    todo, queue = iter(items), deque()
    pool = ThreadPoolExecutor(min(8, available_cpus()))  # PIL, zlib and file reads release the GIL

    def submit():
        item = next(todo, None)
        if item is not None:
            queue.append((item, pool.submit(work, item)))

    try:
        for _ in range(ahead):
            submit()
        with tqdm(total=len(items), desc=desc, unit="img", leave=False, disable=not items or rank() != 0) as bar:
            while queue:
                item, future = queue.popleft()
                submit()
                try:
                    result = future.result()
                except BadImage as e:
                    result = e
                bar.update()
                yield item, result
    finally:
        pool.shutdown(cancel_futures=True)

"""Reading photos of any common kind as 8-bit RGB, and decoding many of them at once.

Every decoder failure becomes a `BadImage` whose message names the file and the reason,
so callers can skip it, say so, and go on.
"""
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from . import cli
from .cli import InputError, UsageError, available_cpus, rank

# The project's decompression limit: a photo of more pixels is refused before it is decoded (a
# decompression bomb fills memory from a file of a few bytes). 250 megapixels reads every phone and
# camera photo (a 108 MP phone mode is 12000 x 9000) and decodes into 750 MB. --max-pixels changes it.
DEFAULT_MAX_PIXELS = 250_000_000
MAX_PIXELS = DEFAULT_MAX_PIXELS


def set_max_pixels(limit):
    """The decompression limit, for every photo this process decodes (each script's --max-pixels).
    Pillow's own check is set to the same limit: it warns inside Image.open above it, where our message
    cannot be given, and raises above twice it; open_rgb checks the size itself, right after the header."""
    global MAX_PIXELS
    MAX_PIXELS = Image.MAX_IMAGE_PIXELS = int(limit)


set_max_pixels(DEFAULT_MAX_PIXELS)


def add_max_pixels_arg(p):
    p.add_argument("--max-pixels", type=cli.positive_int, default=DEFAULT_MAX_PIXELS,
                   help="photos of more pixels than this are refused before they are decoded, as possible "
                        "decompression bombs (12000 x 9000 is 108,000,000)")


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
        with Image.open(path) as img:  # (reads the header only)
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(path, too_many_pixels(f"{img.width}x{img.height} = {img.width * img.height:,}"))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, background)
    except BadImage:
        raise
    except Image.DecompressionBombError:  # over twice the limit: Pillow refuses it inside Image.open
        raise BadImage(path, too_many_pixels(f"more than {2 * MAX_PIXELS:,}")) from None
    except Image.UnidentifiedImageError:  # (Pillow says this of a zero-byte file too)
        raise BadImage(path, "empty file" if _is_empty(path) else "not an image file (unknown format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        if os.path.islink(path) and not os.path.exists(path):
            reason = f"a symbolic link that leads nowhere (broken, or a loop) ({e})"
        else:
            reason = "empty file" if _is_empty(path) else f"corrupt or unreadable image ({e})"
        raise BadImage(path, reason) from None


def too_many_pixels(count):
    return (f"refused as a possible decompression bomb: too many pixels ({count}; the limit is {MAX_PIXELS:,}, "
            "--max-pixels raises it)")


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
    """The pipeline's one resizing rule: the whole photo, squeezed to size x size. No image over the pixel
    limit is made either: Pillow would fill memory a block at a time until the kernel kills the process."""
    if size * size > MAX_PIXELS:
        raise UsageError(f"--img-size {size} makes images of {size * size:,} pixels, over the {MAX_PIXELS:,}-pixel "
                         f"limit (--max-pixels); the largest --img-size under it is {math.isqrt(MAX_PIXELS)}")
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

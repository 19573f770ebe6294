"""Reading photos of any common kind as 8-bit RGB, and listing them in class folders.

Every decoder failure becomes a `BadImage` whose message names the file and the reason,
so callers can skip it, say so, and go on.
"""
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Files that operating systems drop into folders; ignored without a word.
JUNK_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}
# Pillow's own limit (about 89 megapixels) warns; we refuse at that size instead,
# since a decompression bomb can exhaust memory long before the error threshold.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class BadImage(Exception):
    """A file that cannot be used as an image; str() names the file and the reason."""


def is_junk(path) -> bool:
    name = Path(path).name
    return name.startswith(".") or name.lower() in JUNK_NAMES


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
                    raise BadImage(f"{path}: {img.width}x{img.height} pixels is over the "
                                   f"{MAX_PIXELS:,}-pixel safety limit (decompression bomb?)")
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img, background)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"{path}: refused, too many pixels ({e})") from None
    except Image.UnidentifiedImageError:  # (Pillow says this of a zero-byte file too)
        raise BadImage(f"{path}: {'empty file' if _is_empty(path) else 'not an image file (unknown format)'}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        if os.path.islink(path) and not os.path.exists(path):
            reason = f"a symbolic link that leads nowhere (broken, or a loop) ({e})"
        else:
            reason = "empty file" if _is_empty(path) else f"corrupt or unreadable image ({e})"
        raise BadImage(f"{path}: {reason}") from None


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


def list_files(root):
    """All non-junk files below `root`, sorted, following folder links but never in a loop.

    A link that leads nowhere (broken, or a loop) is listed too, so that the caller names it as
    unreadable instead of a photo going missing without a word; FIFOs and other non-files are not.
    """
    root = Path(root)
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if not is_junk(p) and (p.is_file() or (p.is_symlink() and not p.exists())):
                out.append(p)
    return out


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """The pipeline's one resizing rule: the whole photo, squeezed to size x size."""
    return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)

"""Decoded images kept on disk: each labelled folder stores its photos, decoded and squeezed to the
image size once, as a uint8 array in its own hidden `.cache/` folder. Stage 2, reruns and --resume
then start without decoding again.

The key is every file's path relative to the folder, its size and modification time, the image size
and the resize method: change, add or remove one photo and only that folder is decoded again; an
unchanged folder never is. The folder listers skip hidden folders, so the cache is never read as a
class or a photo, and deleting a `.cache/` folder is always safe. `--no-cache` bypasses it.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import files
from .cli import say

FOLDER = ".cache"
# What images.resize_square and data.decode_one produce; change it when they change.
METHOD = "open_rgb + squeeze (bicubic, reducing_gap 3) -> uint8 CHW, v1"


def key(root, samples, img_size):
    """A digest of the folder's files (relative path, size, mtime) in order, the image size and METHOD."""
    digest = hashlib.sha256(f"{METHOD}\n{img_size}\n".encode())
    for path, _ in samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:  # a broken link: decoding reports it; the key only has to notice a change
            stamp = "unreadable"
        digest.update(f"{relative(root, path)}\t{stamp}\n".encode())
    return digest.hexdigest()[:16]


def paths(root, img_size, digest):
    base = Path(root) / FOLDER / f"{img_size}px-{digest}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def relative(root, path):
    """`path` relative to `root`, below which it lies (string slicing: pathlib is slow on 100k files)."""
    root, path = os.fspath(root).rstrip(os.sep), os.fspath(path)
    return path[len(root) + 1:] if path.startswith(root + os.sep) else str(Path(path).relative_to(root))


def load(root, samples, img_size, mmap=False):
    """(uint8 array N,3,S,S of the decodable samples in order, {relative path: why unusable}), or None.
    With mmap the array is memory-mapped, not read: pages come from disk as they are used."""
    array_path, index_path = paths(root, img_size, key(root, samples, img_size))
    try:
        index = json.loads(index_path.read_text())
        images = np.load(array_path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError):
        return None
    return (images, index["bad"]) if len(images) == index["count"] else None


def store(root, samples, img_size, images, bad):
    """Write the array and its index (the index last: it is what marks the pair complete), then remove
    this image size's older caches. A folder that cannot be written is left as it is, with a warning."""
    digest = key(root, samples, img_size)
    array_path, index_path = paths(root, img_size, digest)
    try:
        with files.atomic_path(array_path) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        files.write_json(index_path, {"method": METHOD, "img_size": img_size, "count": len(images), "bad": bad})
        for old in array_path.parent.glob(f"{img_size}px-*"):
            if not old.name.startswith(f"{img_size}px-{digest}."):
                old.unlink(missing_ok=True)
    except OSError as e:  # read-only photos, a full disk: the cache only saves time
        say(f"warning: could not write the decode cache in {array_path.parent} ({e.strerror or e}); "
            "going on without it")

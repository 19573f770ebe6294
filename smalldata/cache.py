"""Decoded images kept on disk: each labelled folder's photos, decoded and squeezed to the image size
once, as a uint8 array in the cache folder (--cache-dir; by default <output folder>/cache). Stage 2,
reruns, --resume and check_score.py then start without decoding again.

The cache lives outside every data folder, so a folder the user or torchvision's ImageFolder reads
as <class>/<image> never holds anything but photos. Each data folder gets its own sub-folder, named
after the folder and a digest of its absolute path. The key of a cached array is every file's path
relative to the folder, its size and modification time, the image size and the resize method:
change, add or remove one photo and only that folder is decoded again. Deleting the cache folder is
always safe; --no-cache bypasses it. On a file system shared between machines (torchrun across
nodes) one process writes each array, atomically, and the others read it.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files, images
from .cli import say

# What images.resize_square and data.decode_one produce; change it when they change.
METHOD = "open_rgb + squeeze (bicubic, reducing_gap 3) -> uint8 CHW, v1"


@dataclass(frozen=True)
class Location:
    """Where the decoded photos of one labelled `folder` are kept, under the cache folder `root`."""
    root: Path
    folder: Path

    @property
    def dir(self):
        absolute = os.path.abspath(self.folder)
        return Path(self.root) / f"{Path(absolute).name}-{hashlib.sha1(absolute.encode()).hexdigest()[:10]}"


def key(loc, samples, img_size):
    """A digest of the folder's files (relative path, size, mtime) in order, the image size and METHOD,
    and the pixel limit when it is not the default (a photo refused under one limit may be read under another)."""
    limit = "" if images.MAX_PIXELS == images.DEFAULT_MAX_PIXELS else f"max_pixels {images.MAX_PIXELS}\n"
    digest = hashlib.sha256(f"{METHOD}\n{img_size}\n{limit}".encode())
    for path, _ in samples:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:  # a broken link: decoding reports it; the key only has to notice a change
            stamp = "unreadable"
        digest.update(f"{relative(loc.folder, path)}\t{stamp}\n".encode())
    return digest.hexdigest()[:16]


def paths(loc, img_size, digest):
    base = loc.dir / f"{img_size}px-{digest}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def relative(root, path):
    """`path` relative to `root`, below which it lies (string slicing: pathlib is slow on 100k files)."""
    root, path = os.fspath(root).rstrip(os.sep), os.fspath(path)
    return path[len(root) + 1:] if path.startswith(root + os.sep) else str(Path(path).relative_to(root))


def load(loc, samples, img_size, mmap=False):
    """(uint8 array N,3,S,S of the decodable samples in order, {relative path: why unusable}), or None.
    With mmap the array is memory-mapped, not read: pages come from disk as they are used."""
    array_path, index_path = paths(loc, img_size, key(loc, samples, img_size))
    try:
        index = json.loads(index_path.read_text())
        images = np.load(array_path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError):
        return None
    return (images, index["bad"]) if len(images) == index["count"] else None


def store(loc, samples, img_size, images, bad):
    """Write the array and its index (the index last: it is what marks the pair complete), then remove
    this folder's older caches of this image size. A cache folder that cannot be written is left as it
    is, with a warning."""
    digest = key(loc, samples, img_size)
    array_path, index_path = paths(loc, img_size, digest)
    try:
        with files.atomic_path(array_path) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
        files.write_json(index_path, {"method": METHOD, "img_size": img_size, "count": len(images), "bad": bad,
                                      "folder": os.path.abspath(loc.folder)})
        for old in array_path.parent.glob(f"{img_size}px-*"):
            if not old.name.startswith(f"{img_size}px-{digest}."):
                old.unlink(missing_ok=True)
    except OSError as e:  # read-only, a full disk: the cache only saves time
        say(f"warning: could not write the decode cache in {array_path.parent} ({e.strerror or e}); "
            "going on without it")


def other_sizes(root, img_size):
    """{image size: bytes} of the caches under `root` made for other image sizes than `img_size`."""
    sizes = {}
    for path in Path(root).glob("*/*px-*.npy") if Path(root).is_dir() else []:
        size = int(path.name.split("px-")[0])
        if size != img_size:
            sizes[size] = sizes.get(size, 0) + path.stat().st_size
    return sizes


def describe_others(root, img_size):
    """One line naming the caches of other image sizes, their size on disk and how to remove them; or None."""
    sizes = other_sizes(root, img_size)
    if not sizes:
        return None
    listed = ", ".join(f"{s} px {b / 2**20:.1f} MB" for s, b in sorted(sizes.items()))
    remove = " ".join(f"'{root}'/*/{s}px-*" for s in sorted(sizes))
    return f"decode caches of other image sizes in {root}: {listed}; not needed now (remove with: rm {remove})"

"""Image sets for training, placed where training reads them.

Each photo is decoded once, squeezed to img_size x img_size and kept as uint8 (900 photos at
256 px are 177 MB), in the decode cache (cache.py). A set that fits (the usual small
data) lives whole on the training device: batches are cut there and augmented there (augment.py),
so the GPU never waits on a DataLoader. A larger one is streamed from the memory-mapped cache, a few
batches ahead (placement, device_batches).
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import cache, memory, records
from .cli import UsageError
from .folders import check_same_classes, empty_classes, find_classes, scan_labelled, val_covers_classes
from .images import BadImage, decode_many, open_rgb, resize_square


def decode_one(path, img_size):
    img = resize_square(open_rgb(path), img_size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(samples, img_size, problems, desc="decode", cache_at=None, mmap=False):
    """Decode (path, label) samples into (uint8 N,3,S,S images, int64 labels); bad files go to `problems`.
    With `cache_at` (a cache.Location: the labelled folder the samples come from and the cache folder),
    the decoded array is read from, or written to, the decode cache; with `mmap` as well, the images are
    the cache's memory-mapped numpy array rather than a tensor in RAM. Returns the images, the labels,
    how they were had ("from cache", "decoded and cached" or "decoded") and the paths of the images kept,
    in order."""
    hit = cache.load(cache_at, samples, img_size, mmap) if cache_at is not None else None
    if hit is not None:
        array, bad = hit
        for text in bad.values():
            problems.skip(text)
        kept = [(path, label) for path, label in samples
                if not bad or cache.relative(cache_at.folder, path) not in bad]
        return (array if mmap else torch.from_numpy(array), torch.tensor([label for _, label in kept], dtype=torch.long),
                "from cache", [path for path, _ in kept])
    images, kept, bad = [], [], {}
    for (path, label), out in decode_many(samples, lambda s: decode_one(s[0], img_size), desc):
        if isinstance(out, BadImage):
            problems.skip(out)
            if cache_at is not None:
                bad[cache.relative(cache_at.folder, path)] = str(out)
            continue
        images.append(out)
        kept.append((path, label))
    x = torch.stack(images) if images else torch.empty(0, 3, img_size, img_size, dtype=torch.uint8)
    labels, paths = torch.tensor([label for _, label in kept], dtype=torch.long), [path for path, _ in kept]
    if cache_at is None:
        return x, labels, "decoded", paths
    cache.store(cache_at, samples, img_size, x.numpy(), bad)
    stored = cache.load(cache_at, samples, img_size, mmap=True) if mmap else None
    return x if stored is None else stored[0], labels, "decoded and cached", paths


def load_training_data(root, img_size, problems, classes=None, use_br=True, use_ocm=True, watch=None,
                       cache_dir=None, device=torch.device("cpu"), data_on="auto", allow_missing_val_classes=False,
                       before_decoding=None):
    """Decode data/train (+ br, ocm), data/val and the --watch folder (through the decode cache in
    `cache_dir`, unless None), and place them for `device` (see placement). data/br and data/ocm are
    used only as their steps completed them, from these photos and classes (records.check); data/val
    must hold every class, unless `allow_missing_val_classes`. `before_decoding()`, when given, runs once the
    folders are found sound and before any photo is decoded (the stage's own checks).

    Returns a dict: classes, counts per source, how each was had ("from cache", "decoded and cached"...),
    where the images are and why, the paths of the photos of each measured set in order ("names": orig,
    val, watch), the classes validation lacks ("val_missing"), and (images, labels) for "orig" (the
    training originals), "train" (originals + br + ocm), "val" and, with `watch`, "watch". Labels are
    on `device`; images are a uint8 tensor there, or host arrays that device_batches streams from.
    """
    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise UsageError(f"{train_dir} not found: put your photos in {train_dir}/<class>/<image>")
    if not val_dir.is_dir():
        raise UsageError(f"{val_dir} not found: model selection needs a labelled validation folder "
                         f"{val_dir}/<class>/<image>")
    if classes is not None and list(classes) != find_classes(train_dir):
        raise UsageError(f"the checkpoint's classes {list(classes)} differ from {train_dir}'s "
                         f"{find_classes(train_dir)}; start from a checkpoint made on this data")
    originals, classes = scan_labelled(train_dir)
    if len(classes) < 2:
        raise UsageError(f"{train_dir} has {len(classes)} class folder(s); a classifier needs at least two")
    empty = empty_classes(originals, classes)
    if empty:
        raise UsageError(f"class folder(s) with no images in {train_dir}: {', '.join(empty)}")
    sources = {"train": originals}
    for name, wanted in (("br", use_br), ("ocm", use_ocm)):
        if wanted:  # never half-made, stale or missing without a word: the step's record says it is whole
            problem = records.check(root, name, classes, originals)
            if problem:
                raise UsageError(problem)
            check_same_classes(classes, root / name, name)
            sources[name] = scan_labelled(root / name, classes)[0]
    held_out = {"val": scan_labelled(val_dir, classes)[0]}
    val_missing = val_covers_classes(held_out["val"], classes, val_dir, allow_missing_val_classes)
    if watch is not None:
        held_out["watch"] = scan_labelled(watch, classes)[0]
    for name, samples in held_out.items():
        if not samples:
            raise UsageError(f"{val_dir if name == 'val' else watch} holds no images")

    # (the originals count twice: alone for measuring, and in the training set)
    counts = [len(s) for s in sources.values()] + [len(originals)] + [len(s) for s in held_out.values()]
    memory.check_decoding(counts, img_size)
    if before_decoding is not None:
        before_decoding()
    n = sum(counts)
    on_device, where = placement(n * 3 * img_size * img_size, device, data_on, cache_dir is not None)
    folders = {"train": train_dir, "br": root / "br", "ocm": root / "ocm", "val": val_dir, "watch": watch}
    decoded = {name: load_images(s, img_size, problems, f"decode {name}", cache.Location(cache_dir, Path(folders[name]))
                                 if cache_dir is not None else None, mmap=True)  # (mapped, then copied in chunks)
               for name, s in {**sources, **held_out}.items()}
    if not len(decoded["val"][1]) or not len(decoded["train"][1]):
        raise UsageError("no decodable images left in data/train or data/val (see the skipped files above)")
    if not val_missing:  # (a class whose every validation photo was unreadable is missing too)
        val_missing = val_covers_classes([(None, int(i)) for i in decoded["val"][1]], classes, val_dir,
                                         allow_missing_val_classes, " that could be read")

    def place(parts):
        labels = torch.cat([decoded[p][1] for p in parts]).to(device)
        if not on_device:
            images = [decoded[p][0] for p in parts]
            return (images[0] if len(images) == 1 else Stacked(images)), labels
        return to_device([decoded[p][0] for p in parts], device), labels

    train = place(list(sources))  # the originals first: "orig" is a view of it, not a second copy
    n_orig = len(decoded["train"][1])
    names = {"orig" if k == "train" else k: [cache.relative(folders[k], p) for p in decoded[k][3]]
             for k in ("train", *held_out)}  # each measured set's photos, in order (val_losses.csv's columns)
    return {"classes": classes, "counts": {k: len(v[1]) for k, v in decoded.items()},
            "how": {k: v[2] for k, v in decoded.items()}, "where": where, "names": names, "val_missing": val_missing,
            "orig": (train[0][:n_orig], train[1][:n_orig]), **{k: place([k]) for k in held_out}, "train": train}


def to_device(arrays, device, chunk=256):
    """One uint8 tensor on `device` holding the arrays one after another, filled `chunk` images at a time
    from each (memory-mapped) array: the host never holds a second copy of the set, only a chunk."""
    if len(arrays) == 1 and torch.is_tensor(arrays[0]) and arrays[0].device.type == torch.device(device).type:
        return arrays[0]  # decoded without a cache, already where it goes
    total = sum(len(a) for a in arrays)
    out = torch.empty((total, *arrays[0].shape[1:]), dtype=torch.uint8, device=device)
    start = 0
    for array in arrays:
        for i in range(0, len(array), chunk):
            part = array[i:i + chunk]
            if not torch.is_tensor(part):  # a read-only memory map: torch cannot wrap it, so copy the chunk
                part = torch.from_numpy(np.array(part))
            out[start + i:start + i + len(part)].copy_(part)
        start += len(array)
    return out


# Share of free memory the whole data set may take on the device with --data-on auto: the rest is
# for the model, its activations and the optimizer (GPU), or for everything else (RAM).
DEVICE_SHARE = 0.5


def available_memory(device):
    """Free bytes on `device`: the GPU's free memory, or the RAM the kernel says is available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def placement(nbytes, device, data_on, use_cache):
    """(whole set on the device?, a line for the banner saying where and why)."""
    free = available_memory(device)
    memory = "GPU memory" if device.type == "cuda" else "RAM"
    size = f"{nbytes / 2**30:.2f} GB of decoded images"
    if data_on == "device" or (data_on == "auto" and nbytes <= DEVICE_SHARE * free):
        why = "--data-on device" if data_on == "device" else \
            f"{nbytes / free:.0%} of the {free / 2**30:.0f} GB free, under --data-on auto's {DEVICE_SHARE:.0%}"
        return True, f"{size} in {memory} ({why}); batches are cut there"
    why = "--data-on stream" if data_on == "stream" else \
        f"over {DEVICE_SHARE:.0%} of the {free / 2**30:.0f} GB of {memory} free (--data-on auto)"
    source = "memory-mapped from the decode cache" if use_cache else "from RAM (--no-cache: nothing to map)"
    return False, (f"{size} streamed, {source} ({why}); a background thread gathers each batch"
                   + (" into pinned memory" if device.type == "cuda" else ""))


class Stacked:
    """Several uint8 arrays (N_i,3,S,S) read as one, without copying them together (maps stay maps)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, idx):
        """The images at the sorted or unsorted int array `idx`, in that order, as one array; a slice
        that is exactly one of the arrays is that array (the originals' view stays a map)."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            for k, array in enumerate(self.arrays):
                if step == 1 and (start, stop) == (self.starts[k], self.starts[k + 1]):
                    return array
            idx = np.arange(start, stop, step)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), *self.arrays[0].shape[1:]), np.uint8)
        for k, array in enumerate(self.arrays):
            chosen = which == k
            if chosen.any():
                out[chosen] = array[idx[chosen] - self.starts[k]]
        return out


PREFETCH = 3  # streamed batches gathered ahead of the one in use


def device_batches(images, order, device_order, device):
    """The uint8 batches images[idx], on `device`, for the CPU index tensors in `order`.

    Images on the device are cut there with the same indices already copied (`device_order`).
    Streamed images (a host tensor, a memory map, Stacked) are gathered PREFETCH batches ahead on a
    background thread (numpy's copy releases the GIL), into pinned memory on a GPU, and each is copied
    without blocking, so the GPU does not wait on the disk or the gather.
    """
    if torch.is_tensor(images) and images.device.type == device.type:  # ("cuda" and "cuda:0" alike)
        for idx in device_order:
            yield images[idx]
        return
    pin = device.type == "cuda"

    def gather(idx):
        batch = images[idx] if torch.is_tensor(images) else torch.from_numpy(images[idx.numpy()])
        return batch.pin_memory() if pin else batch

    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        ahead = deque(pool.submit(gather, idx) for idx in order[:PREFETCH])
        for i in range(len(order)):
            batch = ahead.popleft().result()
            if i + PREFETCH < len(order):
                ahead.append(pool.submit(gather, order[i + PREFETCH]))
            yield batch.to(device, non_blocking=True)


class Normalize:
    """uint8 (or 0-255 float) N,3,H,W -> float, normalised; channels_last on GPU (cuDNN's fastest layout).

    The constants are put on the device once: building them per batch would be a blocking copy each time.
    """

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.channels_last = torch.device(device).type == "cuda"

    def __call__(self, batch):
        x = (batch.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def batch_order(n, batch_size, generator=None, shuffle=True, drop_last=False):
    """Index tensors of each batch; with shuffle, a fresh permutation from `generator`.

    drop_last leaves out a last, smaller batch (when there is a full one): every training step
    then has one shape, so torch.compile never recompiles and BatchNorm never sees a batch of 1.
    """
    idx = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(idx.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches

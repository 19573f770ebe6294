"""Image sets in memory, and augmentation on the training device.

The data are small, so each photo is decoded once, squeezed to img_size x img_size and
kept as uint8 (900 photos at 256 px are 177 MB). Batches are cut from that tensor on the
training device and augmented there with one affine grid_sample per batch, so the GPU is
never waiting on a DataLoader.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cache
from .cli import UsageError
from .folders import check_same_classes, empty_classes, find_classes, scan_labelled
from .images import BadImage, decode_many, open_rgb, resize_square


def decode_one(path, img_size):
    img = resize_square(open_rgb(path), img_size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(samples, img_size, problems, desc="decode", cache_root=None):
    """Decode (path, label) samples into (uint8 N,3,S,S tensor, int64 labels); bad files go to `problems`.
    With `cache_root` (the labelled folder the samples come from), the decoded array is read from, or
    written to, that folder's decode cache (cache.py). Returns the tensors and how they were
    had: "from cache", "decoded and cached" or "decoded"."""
    hit = cache.load(cache_root, samples, img_size) if cache_root is not None else None
    if hit is not None:
        array, bad = hit
        for text in bad.values():
            problems.skip(text)
        labels = [label for path, label in samples if cache.relative(cache_root, path) not in bad]
        return torch.from_numpy(array), torch.tensor(labels, dtype=torch.long), "from cache"
    images, labels, bad = [], [], {}
    for (path, label), out in decode_many(samples, lambda s: decode_one(s[0], img_size), desc):
        if isinstance(out, BadImage):
            problems.skip(out)
            if cache_root is not None:
                bad[cache.relative(cache_root, path)] = str(out)
            continue
        images.append(out)
        labels.append(label)
    x = torch.stack(images) if images else torch.empty(0, 3, img_size, img_size, dtype=torch.uint8)
    if cache_root is None:
        return x, torch.tensor(labels, dtype=torch.long), "decoded"
    cache.store(cache_root, samples, img_size, x.numpy(), bad)
    return x, torch.tensor(labels, dtype=torch.long), "decoded and cached"


def load_training_data(root, img_size, problems, classes=None, use_br=True, use_ocm=True, watch=None,
                       use_cache=True):
    """Decode data/train (+ br, ocm), data/val and the --watch folder (through each folder's decode
    cache unless not `use_cache`).

    Returns a dict: classes, counts per source, how each was had ("from cache", "decoded and cached"...),
    and (x, y) tensors for "orig" (the training originals), "train" (originals + br + ocm), "val"
    and, with `watch`, "watch".
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
        if wanted and (root / name).is_dir():
            check_same_classes(classes, root / name, name)
            sources[name] = scan_labelled(root / name, classes)[0]
    held_out = {"val": scan_labelled(val_dir, classes)[0]}
    if watch is not None:
        held_out["watch"] = scan_labelled(watch, classes)[0]
    for name, samples in held_out.items():
        if not samples:
            raise UsageError(f"{val_dir if name == 'val' else watch} holds no images")

    folders = {"train": train_dir, "br": root / "br", "ocm": root / "ocm", "val": val_dir, "watch": watch}
    decoded = {name: load_images(s, img_size, problems, f"decode {name}", Path(folders[name]) if use_cache else None)
               for name, s in {**sources, **held_out}.items()}
    if not len(decoded["val"][1]) or not len(decoded["train"][1]):
        raise UsageError("no decodable images left in data/train or data/val (see the skipped files above)")
    return {"classes": classes, "counts": {k: len(v[1]) for k, v in decoded.items()},
            "how": {k: v[2] for k, v in decoded.items()},
            "orig": decoded["train"], **{k: decoded[k] for k in held_out},
            "train": tuple(torch.cat([decoded[n][i] for n in sources]) for i in (0, 1))}


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


class Augment:
    """Random resized crop, horizontal flip, small rotation and colour jitter, for a whole batch.

    Our choice of augmentations (the source write-up does not list its own): crop area 35-100 %
    with aspect 3/4-4/3, flip p=0.5, rotation +-15 degrees, brightness/contrast/saturation +-20 %.
    Random numbers come from a CPU generator, so a seeded run is the same on any device.
    """

    def __init__(self, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), degrees=15.0, jitter=0.2):
        self.scale, self.ratio, self.degrees, self.jitter = scale, ratio, degrees, jitter

    def draw(self, n, generator):
        """Per image: 2x3 affine matrix and 3 colour factors, as one (n, 9) CPU tensor."""
        def uniform(lo, hi):
            return torch.rand(n, generator=generator) * (hi - lo) + lo

        area = uniform(*self.scale)
        log_ratio = uniform(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        sx = (area * log_ratio).sqrt().clamp(max=1.0)
        sy = (area / log_ratio).sqrt().clamp(max=1.0)
        tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx)
        ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy)
        angle = uniform(-self.degrees, self.degrees) * math.pi / 180
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        cos, sin = angle.cos(), angle.sin()
        # Output grid -> input coordinates: rotate, scale to the crop, flip x, move to the crop centre.
        theta = [sx * cos * flip, -sy * sin, tx, sx * sin * flip, sy * cos, ty]
        factors = [uniform(1 - self.jitter, 1 + self.jitter) for _ in range(3)]
        return torch.stack(theta + factors, 1)

    def __call__(self, x_uint8, generator):
        n, dev = x_uint8.shape[0], x_uint8.device
        params = self.draw(n, generator)
        if dev.type == "cuda":  # one pinned, asynchronous copy per batch
            params = params.pin_memory()
        params = params.to(dev, non_blocking=True)
        theta, factors = params[:, :6].view(n, 2, 3), params[:, 6:]
        x = x_uint8.float().div_(255)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        brightness, contrast, saturation = (factors[:, i].view(n, 1, 1, 1) for i in range(3))
        x = x * brightness
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * saturation + gray
        return x.clamp_(0, 1).mul_(255)  # back on the 0-255 scale that Normalize expects


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

"""In-memory image sets and GPU-side augmentation.

The data are small, so each photo is decoded once, squeezed to img_size x img_size and
kept as uint8 (900 photos at 256 px are 177 MB). Batches are cut from that tensor on the
training device and augmented there with one affine grid_sample per batch, so the GPU is
never waiting on a DataLoader.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .images import BadImage, open_rgb, resize_square


def decode_one(path, img_size):
    img = resize_square(open_rgb(path), img_size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(samples, img_size, problems=None, desc="decode", workers=None):
    """Decode (path, label) samples into (uint8 N,3,S,S tensor, int64 labels, kept paths).

    Files that fail to decode are reported to `problems` and left out.
    """
    workers = workers or min(8, os.cpu_count() or 1)

    def work(sample):
        try:
            return decode_one(sample[0], img_size)
        except BadImage as e:
            return e

    images, labels, paths = [], [], []
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        results = pool.map(work, samples)
        for (path, label), out in tqdm(zip(samples, results), total=len(samples), desc=desc,
                                       unit="img", leave=False, disable=not samples):
            if isinstance(out, BadImage):
                if problems is None:
                    raise out
                problems.skip(out)
                continue
            images.append(out)
            labels.append(label)
            paths.append(path)
    if not images:
        return torch.empty(0, 3, img_size, img_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long), []
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), paths


def normalize(batch_uint8, mean, std):
    """uint8 (or 0-255 float) N,3,H,W -> float, normalised; channels_last on GPU (cuDNN's fastest layout)."""
    x = batch_uint8.float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


class Augment:
    """Random resized crop, horizontal flip, small rotation and colour jitter, for a whole batch.

    Defaults: crop area 35-100 % with aspect 3/4-4/3, flip p=0.5, rotation +-15 degrees,
    brightness/contrast/saturation +-20 %. Random numbers come from a CPU generator so a
    seeded run is the same on any device.
    """

    def __init__(self, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), degrees=15.0, jitter=0.2):
        self.scale, self.ratio, self.degrees, self.jitter = scale, ratio, degrees, jitter

    def __call__(self, x_uint8, generator):
        n, dev = x_uint8.shape[0], x_uint8.device

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
        theta = torch.stack([torch.stack([sx * cos * flip, -sy * sin, tx], 1),
                             torch.stack([sx * sin * flip, sy * cos, ty], 1)], 1)
        factors = torch.stack([uniform(1 - self.jitter, 1 + self.jitter) for _ in range(3)], 1)

        theta, factors = theta.to(dev, non_blocking=True), factors.to(dev, non_blocking=True)
        x = x_uint8.float().div_(255)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        brightness, contrast, saturation = (factors[:, i].view(n, 1, 1, 1) for i in range(3))
        x = x * brightness
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * saturation + gray
        return x.clamp_(0, 1).mul_(255)  # back on the 0-255 scale that normalize() expects


def batch_order(n, batch_size, generator=None, shuffle=True):
    """Index tensors of each batch; with shuffle, a fresh permutation from `generator`."""
    idx = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(idx.split(batch_size))

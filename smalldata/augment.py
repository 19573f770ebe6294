"""Augmentation of the training batches, on the training device: small batch operations, each drawing
its own random numbers, listed in presets (--augment). airbench's batch_flip_lr and batch_crop are the model.

An operation is one function op(n, generator, **settings) that draws the parameters of n images and
returns them as Geometry (a 2x3 matrix per image from output to input coordinates) or as Pixels (a
function applied to the sampled images, with its parameters). A batch's geometric operations are
composed, in the preset's order from the photo's side, into one matrix per image and applied by one
grid_sample; pixel operations follow, in order. Random numbers come from a CPU generator, so a seeded
run is the same on any device and, under torchrun, every worker draws the global batch's numbers and
takes its share. Our choice of augmentations: the source write-up does not list its own.
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Geometry:
    theta: torch.Tensor  # (n, 2, 3): output grid -> input coordinates, in [-1, 1] units

    def share(self, rank, workers):
        return Geometry(self.theta.tensor_split(workers)[rank])


@dataclass
class Pixels:
    params: torch.Tensor  # (n, k)
    apply: object  # apply(x in 0-1 (n,3,H,W), params on x's device) -> x

    def share(self, rank, workers):
        return Pixels(self.params.tensor_split(workers)[rank], self.apply)


def uniform(n, generator, lo, hi):
    return torch.rand(n, generator=generator) * (hi - lo) + lo


def matrices(a, b, c, d, e, f):
    """Per image 2x3 matrices [[a, b, c], [d, e, f]] from per-image values (tensors or numbers)."""
    n = next(len(v) for v in (a, b, c, d, e, f) if torch.is_tensor(v))
    return torch.stack([v if torch.is_tensor(v) else torch.full((n,), float(v)) for v in (a, b, c, d, e, f)],
                       1).view(n, 2, 3)


# ---------------------------------------------------------------- the operations

def crop(n, generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random resized crop: a box of `scale` of the photo's area and `ratio` aspect (log-uniform), at a
    random place inside the photo, squeezed to the output size."""
    area = uniform(n, generator, *scale)
    aspect = uniform(n, generator, math.log(ratio[0]), math.log(ratio[1])).exp()
    sx, sy = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy)
    return Geometry(matrices(sx, 0, tx, 0, sy, ty))


def rotate(n, generator, degrees=15.0):
    """Rotation by an angle uniform in +-degrees about the image centre (borders reflected)."""
    angle = uniform(n, generator, -degrees, degrees) * math.pi / 180
    return Geometry(matrices(angle.cos(), -angle.sin(), 0, angle.sin(), angle.cos(), 0))


def flip(n, generator, p=0.5):
    """Horizontal flip with probability p."""
    return Geometry(matrices(torch.where(torch.rand(n, generator=generator) < p, -1.0, 1.0), 0, 0, 0, 1, 0))


def colour(n, generator, jitter=0.2):
    """Brightness, contrast and saturation, each scaled by a factor uniform in 1 +- jitter."""
    def apply(x, factors):
        brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
        x = x * brightness
        mean = luma(x).mean((2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        gray = luma(x)
        return (x - gray) * saturation + gray

    return Pixels(torch.stack([uniform(n, generator, 1 - jitter, 1 + jitter) for _ in range(3)], 1), apply)


def luma(x):
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


# ---------------------------------------------------------------- presets

# --augment: each preset is a list of (operation, settings that differ from its defaults). Measured against
# each other in docs/measurements.md.
PRESETS = {
    "full": [(crop, {}), (rotate, {}), (flip, {}), (colour, {})],
    "light": [(crop, {"scale": (0.7, 1.0)}), (flip, {})],
    "none": [],
}


def settings(op, overrides):
    """An operation's full settings: its defaults with the preset's overrides."""
    defaults = {k: p.default for k, p in inspect.signature(op).parameters.items() if p.default is not p.empty}
    return {**defaults, **overrides}


def describe(name):
    """A preset in words, from its operations: 'crop(scale=(0.35, 1.0), ...), flip(p=0.5)'."""
    def text(v):
        return f"({', '.join(text(x) for x in v)})" if isinstance(v, tuple) else f"{v:.3g}"

    ops = [f"{op.__name__}({', '.join(f'{k}={text(v)}' for k, v in settings(op, kw).items())})"
           for op, kw in PRESETS[name]]
    return ", ".join(ops) or "the photos as they are"


def definition(name):
    """A preset as a run records it (JSON): each operation with all its settings, so a resumed run can
    check that it augments as the run it continues did."""
    return [[op.__name__, {k: list(v) if isinstance(v, tuple) else v for k, v in settings(op, kw).items()}]
            for op, kw in PRESETS[name]]


class Augment:
    """A preset's operations applied to uint8 batches."""

    def __init__(self, name="full"):
        self.ops = [(op, settings(op, kw)) for op, kw in PRESETS[name]]

    def draw(self, n, generator):
        return [op(n, generator, **kw) for op, kw in self.ops]

    def __call__(self, x_uint8, generator=None, draws=None):
        """The batch augmented with fresh random numbers, or with `draws` (a torchrun worker's share of those
        drawn for the whole global batch: draw, then share). Without operations, the batch as it is."""
        if not self.ops:
            return x_uint8.float()
        draws = self.draw(x_uint8.shape[0], generator) if draws is None else draws
        dev = x_uint8.device
        geometry = [d.theta for d in draws if isinstance(d, Geometry)]
        x = x_uint8.float().div_(255)
        if geometry:
            theta = torch.eye(3).repeat(len(x), 1, 1)
            for m in geometry:  # (from the photo's side: the first operation's matrix is applied last to the grid)
                theta = theta @ torch.cat([m, _LAST_ROW.expand(len(m), 1, 3)], 1)
            grid = F.affine_grid(to_device(theta[:, :2], dev), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        for d in draws:
            if isinstance(d, Pixels):
                x = d.apply(x, to_device(d.params, dev))
        return x.clamp_(0, 1).mul_(255)  # back on the 0-255 scale that Normalize expects


_LAST_ROW = torch.tensor([0.0, 0.0, 1.0])  # of a 2-D affine matrix in homogeneous coordinates


def share(draws, rank, workers):
    return [d.share(rank, workers) for d in draws]


def to_device(t, device):
    if device.type == "cuda":  # pinned, so that the copy does not wait
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

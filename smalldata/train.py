"""The training loop both stages share: one epoch, exact BatchNorm statistics, and the measurements after it.

This module trains and measures; the stage's epochs (stage.train_epochs) ask the rules of rule.py
what to keep and when to stop.
"""
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import augment, averages, checkpoint, runtime
from .augment import Augment
from .cli import NonFiniteError
from .data import Normalize, batch_order, device_batches
from .model import fp32_head

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "gap", "seconds", "aug_loss",
                  "aug_acc", "images_per_s", "train_n", "val_n", "watch_acc", "train_loss_se", "val_loss_se"]
AVERAGE_COLUMNS = ["val_acc", "val_loss", "val_loss_se", "watch_acc"]  # per weight average, its name_ first
BAR_EVERY_S = 1.0  # the progress bar's loss and accuracy: one host sync this often (bench/gpu_readiness.py: never)


def metric_columns(names=()):
    """metrics.csv's columns, with those of the weight averages `names`."""
    return METRIC_COLUMNS + [f"{a}_{c}" for a in names for c in AVERAGE_COLUMNS]


@dataclass
class Loop:
    """Everything a training step needs, in one place."""
    model: torch.nn.Module  # the weights that are trained and saved
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: torch.dtype  # None: float32
    norm: Normalize
    batch_size: int
    generator: torch.Generator
    compile: bool = False
    precise_bn: bool = True
    augment: Augment = field(default_factory=Augment)
    averages: dict = field(default_factory=dict)  # name -> averages.Average, kept beside the trained weights
    bn_chunk: int = 0  # images per precise-BN forward pass (0: bn_chunk of the image size; see fitting_bn_chunk)

    def __post_init__(self):
        self.scaler = runtime.grad_scaler(self.amp)
        # Under torchrun the training steps go through DDP, which averages the gradients of the
        # workers; measuring and saving use the plain model (its keys have no "module." prefix).
        net = self.model
        if runtime.distributed():
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.device.type == "cuda":  # gradients all-reduced in bf16: half the bytes between GPUs and nodes
                net.register_comm_hook(None, default_hooks.bf16_compress_hook)
        self.step_model = torch.compile(net) if self.compile else net


def make_loop(model, opt, device, amp, mean, std, *, compile=False, sync_bn=False, candidates=None):
    """The training loop of `model` with the optimiser settings `opt` (settings.Optimiser) on `device`;
    `candidates` (settings.Candidates) names the weight averages kept beside it."""
    fp32_head(model)  # logits in float32 under autocast (model.fp32_head)
    if sync_bn:  # BatchNorm statistics over the global batch, not each worker's share (GPUs only)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":  # cuDNN's fastest convolutions want NHWC; on the CPU it is no faster
        model = model.to(memory_format=torch.channels_last)
    # fused: one kernel for all parameters instead of a loop over 30+ tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay, fused=True)
    kept = averages.make(model, candidates.swa_epochs, candidates.ema_epochs) if candidates else {}
    loop = Loop(model, optimizer, device, amp, Normalize(mean, std, device), opt.batch_size,
                torch.Generator().manual_seed(opt.seed), compile, not opt.no_precise_bn, Augment(opt.augment), kept)
    runtime.seed_worker(opt.seed)  # (after the model is built alike everywhere) each worker its own dropout
    return loop


def train_epoch(loop, x_all, y_all, desc="train", steps=None):
    """One pass over the training images with augmentation; returns (loss, acc %, images/s).

    The last partial batch is dropped (see batch_order). Images/s are over the whole epoch, up to its one
    host sync (a first epoch holds torch.compile's compilation and cuDNN's kernel search; on a GPU, work
    is queued, so leaving out the first step's images but not its queued time would read low). `steps`
    stops early (benchmarks only).
    """
    loop.model.train()
    rank, workers, _ = runtime.world()
    batches = batch_order(len(y_all), loop.batch_size, loop.generator, drop_last=True)
    if steps is not None:
        batches = batches[:steps]
    sizes = [len(b) for b in batches]  # global batches: every worker draws the same order...
    mine = [b.tensor_split(workers)[rank] for b in batches]  # ...and takes its share of each
    order = torch.cat(mine).to(loop.device, non_blocking=True).split([len(b) for b in mine])  # one copy per epoch
    loss_sum = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.long)
    first_bad = torch.full((), -1, device=loop.device, dtype=torch.long)  # the first step whose loss was not finite
    start = shown = time.perf_counter()
    bar = tqdm(order, desc=desc, unit="batch", leave=False, file=sys.stdout, disable=rank != 0)
    for step, (idx, x_uint8) in enumerate(zip(bar, device_batches(x_all, mine, order, loop.device))):
        draws = augment.share(loop.augment.draw(sizes[step], loop.generator), rank, workers)
        x, y = loop.norm(loop.augment(x_uint8, draws=draws)), y_all[idx]
        with runtime.autocast(loop.device, loop.amp):
            logits = loop.step_model(x)
            loss = F.cross_entropy(logits, y)
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        for average in loop.averages.values():
            average.after_step(loop.model, len(batches))
        loss_sum += loss.detach().float() * len(idx)  # accumulated on the device: no host sync per step
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        correct += (logits.argmax(1) == y).sum()
        if time.perf_counter() - shown > BAR_EVERY_S and rank == 0:  # the bar's numbers: one host sync a second
            shown, seen = time.perf_counter(), sum(len(b) for b in mine[:step + 1])
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100.0 * correct.item() / seen:.1f}%",
                            refresh=False)
    seen = sum(sizes)
    broken = (~torch.stack([torch.isfinite(p).all() for p in loop.model.parameters()]).all()).double()
    totals = runtime.all_sum_tensor(torch.stack([loss_sum.double(), correct.double(), broken]))  # (torchrun)
    loss_total, correct_total, broken = totals.tolist()  # the one sync of the epoch
    loss, acc = loss_total / seen, 100.0 * correct_total / seen
    if not math.isfinite(loss) or broken:
        step = int(first_bad.item())
        raise NonFiniteError(f"the training loss became NaN or inf at step {step + 1} of {len(sizes)} of this epoch"
                             if step >= 0 else "the weights became NaN or inf in this epoch (its losses were finite)")
    return loss, acc, seen / max(time.perf_counter() - start, 1e-9)


def _batches(loop, x_all, shard=False):
    """(device indices, normalised images) of each evaluation batch, in order; with `shard`, only this
    torchrun worker's contiguous share of the set."""
    indices = torch.arange(len(x_all))
    if shard:
        rank, workers, _ = runtime.world()
        indices = indices.tensor_split(workers)[rank]
    batches = list(indices.split(2 * loop.batch_size))
    order = [idx.to(loop.device, non_blocking=True) for idx in batches]
    for idx, x in zip(order, device_batches(x_all, batches, order, loop.device)):
        yield idx, loop.norm(x)


class _Truncate(Exception):
    """Raised by a hook to end a forward pass once the layer it measures has seen its input."""


def batchnorm_layers(model, probe):
    """The BatchNorm layers of `model` that keep running statistics, in the order a forward pass calls
    them (found with one image: the order the modules were declared in need not be that order)."""
    order, handles = [], []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            handles.append(m.register_forward_pre_hook(lambda mod, _: order.append(mod) if mod not in order else None))
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
    return order


def bn_chunk(img_size):
    """Images per forward pass of the precise-BN computation on a CPU: 128 at 256 px, more for smaller
    photos. Fixed by the image size: how the images are grouped changes the last bits of the statistics,
    and a resumed run must repeat an uninterrupted one exactly."""
    return max(8, 128 * 256 * 256 // (img_size * img_size))


@torch.no_grad()
def fitting_bn_chunk(loop, x_all):
    """Images per precise-BN forward pass for this run: on a GPU as many as half its free memory holds (a
    probe of 8 images measures what one takes; the same number on every torchrun worker), so that 275
    originals at 256 px take one pass instead of one per BatchNorm layer; on a CPU bn_chunk. Measured once,
    when the run starts, and kept in its state: a resumed run uses the same (see bn_chunk)."""
    size = x_all.shape[-1]
    if loop.device.type != "cuda" or not len(x_all):
        return bn_chunk(size)
    probe = _images(loop, x_all, torch.arange(min(8, len(x_all))))
    torch.cuda.synchronize(loop.device)
    before = torch.cuda.memory_allocated(loop.device)
    torch.cuda.reset_peak_memory_stats(loop.device)
    loop.model.eval()
    with runtime.autocast(loop.device, loop.amp):
        loop.model(probe.float())
    per_image = max(1, (torch.cuda.max_memory_allocated(loop.device) - before) // len(probe))
    chunk = torch.tensor(max(8, int(0.5 * torch.cuda.mem_get_info(loop.device)[0] // (2 * per_image))))
    return int(runtime.all_min(chunk.to(loop.device)).item())  # (x2: precise BN keeps float32 copies of inputs)


def _moments(x):
    """(count, sum, sum of squares) per channel of a BatchNorm input, in float64 (float32 inside a batch);
    zeros for no images (a torchrun worker whose share is empty adds nothing, rather than NaN)."""
    if x.shape[0] == 0:
        return torch.zeros(1 + 2 * x.shape[1], device=x.device, dtype=torch.float64)
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.float(), dims, correction=0)
    count = x.numel() // x.shape[1]
    return torch.cat([torch.full((1,), count, device=x.device, dtype=torch.float64), count * mean.double(),
                      count * (var.double() + mean.double() ** 2)])


def _set_statistics(layer, moments):
    """Running mean and (unbiased, as BatchNorm keeps it) variance from summed moments."""
    count, channels = moments[0], layer.running_mean.numel()
    mean = moments[1:1 + channels] / count
    var = (moments[1 + channels:] / count - mean ** 2).clamp_(min=0) * count / max(count - 1, 1)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)


@torch.no_grad()
def precise_bn(loop, x_all, model=None, chunk=None):
    """Exact BatchNorm statistics of the weights on `x_all` (the training originals): each layer gets
    the mean and variance of its input over every image, with the layers before it already normalised
    by their own exact statistics, which is what evaluation then sees. Independent of the batch size
    and of the number of torchrun workers (each takes its share, the sums are added up).

    Why: the running averages (momentum 0.1) lag behind weights that changed a lot in a few steps, and
    averaging per-batch statistics weighs a small last batch like a full one and leaves out the spread
    between batches. When a worker's share fits in one forward pass (`chunk` images, bn_chunk), one
    pass does it: each layer normalises its whole input with the statistics of that input. Otherwise
    one pass per layer, each cut short after that layer.
    """
    model = model or loop.model
    model.eval()
    rank, workers, _ = runtime.world()
    share = torch.arange(len(x_all)).tensor_split(workers)[rank]
    probe = _images(loop, x_all, torch.arange(1))
    with runtime.autocast(loop.device, loop.amp):
        layers = batchnorm_layers(model, probe)
        if not layers:
            return
        chunk = chunk or loop.bn_chunk or bn_chunk(probe.shape[-1])
        single = torch.tensor(float(len(share) <= chunk), device=loop.device)
        runtime.all_min(single)  # every worker takes the same way
        if single.item():
            def exact(layer, inputs):
                _set_statistics(layer, runtime.all_sum_tensor(_moments(inputs[0])))
            handles = [layer.register_forward_pre_hook(exact) for layer in layers]
            try:
                model(_images(loop, x_all, share))
            finally:
                for h in handles:
                    h.remove()
            return
        for layer in layers:  # one pass per layer: its input no longer depends on how images are grouped
            moments = torch.zeros(1 + 2 * layer.running_mean.numel(), device=loop.device, dtype=torch.float64)

            def collect(_, inputs):
                moments.add_(_moments(inputs[0]))
                raise _Truncate
            handle = layer.register_forward_pre_hook(collect)
            try:
                for idx in share.split(chunk):
                    try:
                        model(_images(loop, x_all, idx))
                    except _Truncate:
                        pass
            finally:
                handle.remove()
            _set_statistics(layer, runtime.all_sum_tensor(moments))


def _images(loop, x_all, idx):
    return loop.norm(next(device_batches(x_all, [idx], [idx.to(loop.device)], loop.device)))


@torch.inference_mode()
def evaluate(loop, x_all, y_all, model=None, per_image=False):
    """(loss, its standard error, accuracy %) in eval mode without augmentation. The loss is the mean
    cross-entropy over the images and its standard error that of a mean (sd / sqrt(n) of the per-image
    losses), so a decision can tell a change from noise. Loss and argmax are in float32. Under torchrun
    each worker measures its share and the sums are added up: every worker gets the same numbers,
    so every worker takes the same decisions. With `per_image`, a fourth value: each image's loss and
    whether it was classified correctly, in order (PerImage): the same photos are measured every epoch,
    so a change between two epochs can be judged photo by photo (paired)."""
    model = model or loop.model
    model.eval()
    sums = torch.zeros(3, device=loop.device, dtype=torch.float64)  # loss, loss squared, correct
    each = torch.zeros(2, len(y_all), device=loop.device, dtype=torch.float64) if per_image else None
    for idx, x in _batches(loop, x_all, shard=True):
        y = y_all[idx]
        with runtime.autocast(loop.device, loop.amp):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none").double()
        hits = (logits.argmax(1) == y).double()
        sums += torch.stack([losses.sum(), (losses * losses).sum(), hits.sum()])
        if per_image:
            each[0, idx], each[1, idx] = losses, hits
    loss_sum, square_sum, correct = runtime.all_sum_tensor(sums).tolist()
    n = len(y_all)
    mean = loss_sum / n
    se = math.sqrt(max(square_sum / n - mean * mean, 0.0) / (n - 1)) if n > 1 else math.nan
    if per_image:
        losses, hits = runtime.all_sum_tensor(each).tolist()  # (the one copy to the host of the set)
        return mean, se, 100.0 * correct / n, PerImage([round(v, 5) for v in losses],
                                                       "".join("1" if v else "0" for v in hits))
    return mean, se, 100.0 * correct / n


@dataclass(frozen=True)
class PerImage:
    losses: list  # cross-entropy of each image, in the set's order
    correct: str  # "1" where the image was classified correctly, "0" where not


def measure(loop, data, epoch, seconds, aug):
    """The epoch's row of metrics.csv: accuracy, loss and the loss's standard error on the training
    originals and on val (and watch), after exact BatchNorm statistics, so every saved checkpoint
    carries statistics of its own weights (weight averages: measure_average)."""
    if loop.precise_bn:
        precise_bn(loop, data["orig"][0])
    train_loss, train_loss_se, train_acc, train_each = evaluate(loop, *data["orig"], per_image=True)
    val_loss, val_loss_se, val_acc, val_each = evaluate(loop, *data["val"], per_image=True)
    row = {"epoch": epoch, "lr": loop.optimizer.param_groups[0]["lr"], "train_loss": round(train_loss, 5),
           "train_acc": round(train_acc, 3), "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 3),
           "gap": round(train_acc - val_acc, 3), "train_n": len(data["orig"][1]), "val_n": len(data["val"][1]),
           "seconds": round(seconds, 3), "aug_loss": round(aug[0], 5), "aug_acc": round(aug[1], 3),
           "images_per_s": round(aug[2], 1), "train_loss_se": round(train_loss_se, 5),
           "val_loss_se": round(val_loss_se, 5),
           # per photo, for paired comparisons between epochs (val_losses.csv, train_losses.csv, watch.csv)
           "train_losses": train_each.losses, "train_correct": train_each.correct,
           "val_losses": val_each.losses, "val_correct": val_each.correct}
    if "watch" in data:  # analysis only: no decision reads it
        _, _, acc, watch_each = evaluate(loop, *data["watch"], per_image=True)
        row["watch_correct"], row["watch_acc"] = watch_each.correct, round(acc, 3)
    return row


def measure_average(loop, data, average):
    """The columns of a weight average (averages.py), as it stands: its val (and watch) numbers, after its
    own exact BatchNorm statistics."""
    if loop.precise_bn:
        precise_bn(loop, data["orig"][0], average.model)
    loss, se, acc = evaluate(loop, *data["val"], model=average.model)
    name = average.name
    out = {f"{name}_val_acc": round(acc, 3), f"{name}_val_loss": round(loss, 5), f"{name}_val_loss_se": round(se, 5)}
    if "watch" in data:
        _, _, acc, each = evaluate(loop, *data["watch"], model=average.model, per_image=True)
        out[f"{name}_watch_correct"], out[f"{name}_watch_acc"] = each.correct, round(acc, 3)
    return out


# ---------------------------------------------------------------- what --resume needs

def rng_state(loop):
    """This worker's random state: the CPU's and its GPU's (dropout: each worker its own), and the shared
    generator of batch order and augmentation."""
    # (this worker's GPU only: a resume may see fewer GPUs than the run had)
    return {"torch": torch.get_rng_state(), "generator": loop.generator.get_state(),
            "cuda": torch.cuda.get_rng_state(loop.device) if loop.device.type == "cuda" else None}


def training_state(loop, history, stage, optimizer=True, ranks=None):
    """Everything last.pth adds to the weights: optimizer and scaler (unless not `optimizer`), the random
    state (`ranks`: every torchrun worker's, in rank order, from runtime.gather), history, the stage's state."""
    # (device copies: checkpoint.save moves them to the host on the keeper's writer thread)
    return {"model": loop.model, "optimizer": checkpoint.snapshot(loop.optimizer.state_dict()) if optimizer else None,
            "scaler": loop.scaler.state_dict() if optimizer and loop.scaler.is_enabled() else None,
            "rng": rng_state(loop), "rng_ranks": ranks, "history": list(history), "stage": dict(stage),
            "averages": {name: a.state_dict() for name, a in loop.averages.items()}}


def restore_training_state(loop, ckpt):
    """Continue from a last.pth exactly: optimizer (in each parameter's memory layout), scaler, RNG (each
    torchrun worker its own, when the run had as many workers).
    A finished stage's last.pth has no optimizer state (see Keeper.save_last): Adam then starts afresh."""
    if ckpt.get("optimizer"):
        loop.optimizer.load_state_dict(ckpt["optimizer"])
    for group in loop.optimizer.param_groups:  # a CPU-made state is NCHW; on the GPU parameters are NHWC
        for p in group["params"]:
            for key, value in loop.optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    loop.optimizer.state[p][key] = torch.empty_like(p).copy_(value)
    if ckpt.get("scaler") and loop.scaler.is_enabled():
        loop.scaler.load_state_dict(ckpt["scaler"])
    for name, state in ckpt.get("averages", {}).items():
        if name in loop.averages:
            loop.averages[name].load_state_dict(state)
    rank, workers, _ = runtime.world()
    ranks = ckpt.get("rng_ranks") or []
    rng = ranks[rank] if len(ranks) == workers else ckpt["rng"]  # (another number of workers: rank 0's)
    torch.set_rng_state(rng["torch"])
    loop.generator.set_state(rng["generator"])
    restore_cuda_rng(rng.get("cuda"), loop.device)


def restore_cuda_rng(saved, device):
    """This worker's GPU random state, from a last.pth made on any number of GPUs (written before this
    version: one state per visible GPU, whose first is this worker's, as training used one GPU each)."""
    if isinstance(saved, (list, tuple)):
        saved = saved[0] if saved else None
    if saved is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved, device)

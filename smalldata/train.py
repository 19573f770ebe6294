"""The training loop both stages share: one epoch, the measurements after it, and fit() that runs them.

This module trains and measures; what a stage keeps and when it stops is decided in
stages.py by the rules of recipe.py.
"""
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from . import checkpoint, runtime
from .cli import say
from .data import Augment, Normalize, batch_order, device_batches

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "gap", "seconds", "aug_loss",
                  "aug_acc", "images_per_s", "train_n", "val_n", "watch_acc"]


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

    def __post_init__(self):
        self.scaler = runtime.grad_scaler(self.amp)
        # Under torchrun the training steps go through DDP, which averages the gradients of the
        # workers; measuring and saving use the plain model (its keys have no "module." prefix).
        net = self.model
        if runtime.distributed():
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_model = torch.compile(net) if self.compile else net


def make_loop(model, *, lr, weight_decay, device, amp, mean, std, batch_size, seed, compile=False,
              precise_bn=True, sync_bn=False):
    if sync_bn:  # BatchNorm statistics over the global batch, not each worker's share (GPUs only)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda":  # cuDNN's fastest convolutions want NHWC; on the CPU it is no faster
        model = model.to(memory_format=torch.channels_last)
    # fused: one kernel for all parameters instead of a loop over 30+ tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    return Loop(model, optimizer, device, amp, Normalize(mean, std, device), batch_size,
                torch.Generator().manual_seed(seed), compile, precise_bn)


def train_epoch(loop, x_all, y_all, desc="train", steps=None):
    """One pass over the training images with augmentation; returns (loss, acc %, images/s).

    The last partial batch is dropped (see batch_order). Images/s leave out the first step,
    which holds torch.compile's compilation and cuDNN's kernel search. `steps` stops early
    (benchmarks only).
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
    start = shown = time.perf_counter()
    bar = tqdm(order, desc=desc, unit="batch", leave=False, file=sys.stdout, disable=rank != 0)
    for step, (idx, x_uint8) in enumerate(zip(bar, device_batches(x_all, mine, order, loop.device))):
        params = loop.augment.draw(sizes[step], loop.generator).tensor_split(workers)[rank]
        x, y = loop.norm(loop.augment(x_uint8, loop.generator, params)), y_all[idx]
        with runtime.autocast(loop.device, loop.amp):
            logits = loop.step_model(x)
            loss = F.cross_entropy(logits, y)
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loss_sum += loss.detach().float() * len(idx)  # accumulated on the device: no host sync per step
        correct += (logits.argmax(1) == y).sum()
        if step == 0:
            timed_from = time.perf_counter()
        if time.perf_counter() - shown > 1.0 and rank == 0:  # the bar's numbers: one host sync a second
            shown, seen = time.perf_counter(), sum(len(b) for b in mine[:step + 1])
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100.0 * correct.item() / seen:.1f}%",
                            refresh=False)
    seen = sum(sizes)
    loss_sum, correct = runtime.all_sum(loss_sum, correct)  # over the workers (torchrun)
    loss, acc = loss_sum.item() / seen, 100.0 * correct.item() / seen  # the one sync of the epoch
    timed = time.perf_counter() - timed_from
    ips = (seen - sizes[0]) / timed if len(sizes) > 1 and timed > 0 else seen / (time.perf_counter() - start)
    return loss, acc, ips


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


@torch.no_grad()
def precise_bn(loop, x_all):
    """Recompute the BatchNorm running statistics on `x_all` in train mode ("precise BN").

    The running averages (momentum 0.1) lag far behind weights that changed a lot in a few steps;
    evaluated with them, accuracy swings from epoch to epoch although the weights barely differ.
    """
    with runtime.autocast(loop.device, loop.amp):  # (each worker the whole set: all get the same statistics)
        update_bn((x for _, x in _batches(loop, x_all)), loop.model)


@torch.inference_mode()
def evaluate(loop, x_all, y_all):
    """Loss and accuracy (%) in eval mode without augmentation; loss and argmax in float32,
    so a decision read from them does not move with the autocast dtype. Under torchrun each
    worker measures its share and the sums are added up: every worker gets the same numbers,
    so every worker takes the same decisions."""
    loop.model.eval()
    loss_sum = torch.zeros((), device=loop.device)
    correct = torch.zeros((), device=loop.device, dtype=torch.long)
    for idx, x in _batches(loop, x_all, shard=True):
        y = y_all[idx]
        with runtime.autocast(loop.device, loop.amp):
            logits = loop.model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    loss_sum, correct = runtime.all_sum(loss_sum, correct)
    return loss_sum.item() / len(y_all), 100.0 * correct.item() / len(y_all)


def measure(loop, data, epoch, seconds, aug):
    """The epoch's row of metrics.csv: accuracy and loss on the training originals and on val
    (and watch), after BatchNorm recalibration, so every saved checkpoint carries matching statistics."""
    if loop.precise_bn:
        precise_bn(loop, data["orig"][0])
    train_loss, train_acc = evaluate(loop, *data["orig"])
    val_loss, val_acc = evaluate(loop, *data["val"])
    row = {"epoch": epoch, "lr": loop.optimizer.param_groups[0]["lr"], "train_loss": round(train_loss, 5),
           "train_acc": round(train_acc, 3), "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 3),
           "gap": round(train_acc - val_acc, 3), "train_n": len(data["orig"][1]), "val_n": len(data["val"][1]),
           "seconds": round(seconds, 3), "aug_loss": round(aug[0], 5), "aug_acc": round(aug[1], 3),
           "images_per_s": round(aug[2], 1)}
    if "watch" in data:  # analysis only: no decision reads it
        row["watch_acc"] = round(evaluate(loop, *data["watch"])[1], 3)
    return row


def fit(loop, data, first_epoch, last_epoch, on_epoch, eval_first=False):
    """Train epochs first_epoch..last_epoch; on_epoch(row) runs after each and returns True to stop.
    With eval_first, the starting weights are measured first, as epoch 0."""
    if eval_first and first_epoch == 1:
        on_epoch(measure(loop, data, 0, 0.0, (math.nan, math.nan, 0.0)))
    for epoch in range(first_epoch, last_epoch + 1):
        t0 = time.perf_counter()
        aug = train_epoch(loop, *data["train"], desc=f"epoch {epoch}/{last_epoch}")
        row = measure(loop, data, epoch, time.perf_counter() - t0, aug)
        say(f"epoch {epoch:3d}  train {row['train_acc']:6.2f}%  val {row['val_acc']:6.2f}%  gap {row['gap']:6.2f}  "
            f"val_loss {row['val_loss']:.4f}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s")
        if on_epoch(row):
            break


# ---------------------------------------------------------------- what --resume needs

def training_state(loop, history, stage, optimizer=True):
    """Everything last.pth adds to the weights: optimizer and scaler (unless not `optimizer`), RNG
    states, history, the stage's own state."""
    return {"model": loop.model, "optimizer": checkpoint.to_host(loop.optimizer.state_dict()) if optimizer else None,
            "scaler": loop.scaler.state_dict() if optimizer and loop.scaler.is_enabled() else None,
            "rng": {"torch": torch.get_rng_state(), "generator": loop.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "history": list(history), "stage": dict(stage)}


def restore_training_state(loop, ckpt):
    """Continue from a last.pth exactly: optimizer (in each parameter's memory layout), scaler, RNG.
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
    torch.set_rng_state(ckpt["rng"]["torch"])
    loop.generator.set_state(ckpt["rng"]["generator"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])

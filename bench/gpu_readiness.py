"""The GPU-only paths, checked in one run on the first device (docs/measurements.md, "On a GPU").

    python bench/gpu_readiness.py --images PHOTOS           # PHOTOS: <class>/<image> folders

Checks, each printed with its numbers: host syncs in a training step (torch.cuda.set_sync_debug_mode),
images/s with the checkpoint keeper working against the bare loop, NCHW<->NHWC conversion kernels
in a profiler trace, recompiles under --compile, a CPU-made optimizer state resumed on CUDA, two
--deterministic runs, and peak GPU memory. On a CPU it runs what a CPU can (no sync mode, profiler
or peak memory) as a smoke test of the script itself.
"""
import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata import IMAGENET_MEAN, IMAGENET_STD, runtime, train  # noqa: E402
from smalldata.cli import Problems  # noqa: E402
from smalldata.data import load_images  # noqa: E402
from smalldata.folders import scan_labelled  # noqa: E402
from smalldata.keeper import Keeper  # noqa: E402
from smalldata.layout import RunPaths  # noqa: E402
from smalldata.settings import Optimiser  # noqa: E402
from smalldata.train import make_loop, measure, restore_training_state, train_epoch, training_state  # noqa: E402

FIGURES = {}  # what --json writes: the numbers bench/gpu_check.sh puts in its table


def loop_for(args, device, amp, classes, seed=0, compile=False):
    model = torchvision.models.get_model(args.arch, num_classes=classes)
    return make_loop(model, Optimiser(lr=1e-4, batch_size=args.batch_size, seed=seed), device, amp, IMAGENET_MEAN,
                     IMAGENET_STD, compile=compile)


def syncs_per_step(loop, x, y):
    if loop.device.type != "cuda":
        return "n/a on CPU"
    every, train.BAR_EVERY_S = train.BAR_EVERY_S, float("inf")  # (the progress bar's once-a-second read aside)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(loop, x, y, "sync check")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            train.BAR_EVERY_S = every
    steps = len(y) // loop.batch_size
    FIGURES["host syncs per epoch"] = len(caught)
    return f"{len(caught)} synchronising calls in {steps} steps (expected: 2, at the epoch's end)"


def everything_per_epoch(args, loop, x, y, classes):
    """The goal "at least 85 % of the bare step rate with everything per-epoch included": images/s of
    training epochs alone against whole stage-1 epochs (train, exact BatchNorm statistics and evaluation
    of the training originals and of val, the keeper's snapshot and last.pth), in the recipe's
    proportions: a quarter of the training images are originals, val a ninth of the training set."""
    n = len(y)
    data = {"train": (x, y), "orig": (x[: n // 4], y[: n // 4]), "val": (x[: n // 9], y[: n // 9])}
    bare = sorted(train_epoch(loop, x, y, "bare")[2] for _ in range(args.epochs))[args.epochs // 2]
    with tempfile.TemporaryDirectory() as tmp:
        meta = dict(arch=args.arch, classes=[str(i) for i in range(classes)], img_size=args.img_size,
                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), args={})
        keeper = Keeper(RunPaths(Path(tmp), "stage1", Path(tmp)), meta)
        rates = []
        for epoch in range(1, args.epochs + 1):
            t0 = time.perf_counter()
            aug = train_epoch(loop, x, y, "whole epoch")
            row = measure(loop, data, epoch, 0.0, aug)
            keeper.snapshot(loop.model, row, needed={epoch})
            keeper.save_last(epoch, lambda optimizer: training_state(loop, [row], {}, optimizer))
            if loop.device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(n / (time.perf_counter() - t0))
        keeper.close()
    whole = sorted(rates)[len(rates) // 2]
    FIGURES["training images/s, bare"] = round(bare, 1)
    FIGURES["training images/s, whole epochs"] = round(whole, 1)
    FIGURES["whole epochs / bare"] = round(whole / bare, 3)
    return (f"median of {args.epochs} epochs: bare {bare:.1f} images/s; whole epochs (measure + keeper) "
            f"{whole:.1f} images/s = {whole / bare:.0%} of bare (goal: at least 85 %)")


def with_and_without_keeper(args, loop, x, y, classes):
    """images/s of a few epochs each: the bare loop; with the Keeper as training runs it (a host copy of
    the weights every epoch, last.pth at most every LAST_EVERY_S seconds); and with last.pth every epoch."""
    def epochs(keeper, every_epoch=False):
        rates = []
        for epoch in range(1, args.epochs + 1):
            rates.append(train_epoch(loop, x, y, "keeper" if keeper else "bare")[2])
            if keeper:
                row = {"epoch": epoch}
                keeper.snapshot(loop.model, row, needed={epoch})
                if every_epoch:
                    keeper.last_saved_at = -1e9
                keeper.save_last(epoch, lambda optimizer: training_state(loop, [row], {}, optimizer))
        return sorted(rates)[len(rates) // 2]

    def kept(every_epoch):
        with tempfile.TemporaryDirectory() as tmp:
            meta = dict(arch=args.arch, classes=[str(i) for i in range(classes)], img_size=args.img_size,
                        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), args={})
            keeper = Keeper(RunPaths(Path(tmp), "stage1", Path(tmp)), meta)
            rate = epochs(keeper, every_epoch)
            keeper.close()
        return rate

    bare, default, worst = epochs(None), kept(False), kept(True)
    FIGURES["keeper / bare"] = round(default / bare, 3)
    return (f"median of {args.epochs} epochs: bare {bare:.1f} images/s; with the keeper as in training "
            f"{default:.1f} ({default / bare:.0%}); writing last.pth every epoch {worst:.1f} ({worst / bare:.0%})")


def conversion_kernels(loop, x, y):
    if loop.device.type != "cuda":
        return "n/a on CPU"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_epoch(loop, x[: 4 * loop.batch_size], y[: 4 * loop.batch_size], "profile")
    names = [e.key for e in prof.key_averages() if "nchw" in e.key.lower() or "nhwc" in e.key.lower()
             or "convert" in e.key.lower()]
    return f"{len(names)} layout-conversion kernels" + (f": {', '.join(names[:5])}" if names else "")


def recompiles(args, device, amp, classes, x, y):
    import torch._dynamo

    torch._dynamo.reset()
    loop = loop_for(args, device, amp, classes, compile=True)
    t0 = time.perf_counter()
    train_epoch(loop, x, y, "compile 1")
    first = time.perf_counter() - t0
    ips = train_epoch(loop, x, y, "compile 2")[2]
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return f"{frames} compiled graph(s) over two epochs; first epoch {first:.1f} s, then {ips:.0f} images/s"


def cpu_state_resumed_here(args, device, amp, classes, x, y):
    cpu = loop_for(args, torch.device("cpu"), None, classes)
    train_epoch(cpu, x[: 2 * args.batch_size].cpu(), y[: 2 * args.batch_size].cpu(), "cpu")
    state = training_state(cpu, [], {})
    state["rng"]["cuda"] = None
    here = loop_for(args, device, amp, classes)
    here.model.load_state_dict(cpu.model.state_dict())
    restore_training_state(here, state)
    train_epoch(here, x, y, "resumed")
    return "a CPU-made Adam state resumed and stepped"


def deterministic_twice(args, device, amp, classes, x, y):
    losses = []
    for _ in range(2):
        runtime.setup(device.type, seed=0, deterministic=True)  # the same seeds, then the same run
        losses.append(train_epoch(loop_for(args, device, amp, classes), x, y, "deterministic")[0])
    torch.use_deterministic_algorithms(False)
    return f"losses {losses[0]:.6f} and {losses[1]:.6f}: {'identical' if losses[0] == losses[1] else 'DIFFERENT'}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--arch", default="vgg13_bn")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    device, amp = runtime.setup("auto", seed=0)
    samples, classes = scan_labelled(args.images)
    x, y, *_ = load_images(samples, args.img_size, Problems())
    x, y = x.to(device), y.to(device)
    print(runtime.describe(device, amp), f"; {len(y)} images at {args.img_size} px, {args.arch}")
    loop = loop_for(args, device, amp, len(classes))
    train_epoch(loop, x, y, "warm-up")
    checks = {
        "host syncs": lambda: syncs_per_step(loop, x, y),
        "checkpoint keeper": lambda: with_and_without_keeper(args, loop, x, y, len(classes)),
        "everything per epoch": lambda: everything_per_epoch(args, loop, x, y, len(classes)),
        "layout conversions": lambda: conversion_kernels(loop, x, y),
        "torch.compile": lambda: recompiles(args, device, amp, len(classes), x, y),
        "CPU last.pth on this device": lambda: cpu_state_resumed_here(args, device, amp, len(classes), x, y),
        "--deterministic twice": lambda: deterministic_twice(args, device, amp, len(classes), x, y),
    }
    for name, check in checks.items():
        try:
            print(f"{name:30s} {check()}", flush=True)
        except Exception as e:  # report and go on: one run should show every item
            print(f"{name:30s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if device.type == "cuda":
        FIGURES["peak GPU memory GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print(f"{'peak GPU memory':30s} {FIGURES['peak GPU memory GiB']} GiB")
    if args.json:
        args.json.write_text(json.dumps(FIGURES, indent=1))


if __name__ == "__main__":
    main()

"""The GPU-only paths and the per-epoch cost, measured in-process (bench/gpu_check.sh runs each part as a step).

    python bench/gpu_readiness.py setup --json F                          # versions, the device, onnxruntime's CUDA
    python bench/gpu_readiness.py breakdown --images TRAIN --val VAL --json F   # one stage-1 epoch, part by part
    python bench/gpu_readiness.py compile --images TRAIN --json F         # torch.compile: graphs, first epoch, rate

breakdown: at the recipe's size by default (1,100 training images, 275 of them originals, 200 val, 256 px,
batch 32, vgg13_bn, the SWA average that stage 1 keeps), made by repeating the photos given. Bare training
epochs, then whole epochs as stage 1 runs them: train, the SWA mean, precise BN of the weights and of the
SWA mean, the evaluations, the keeper's snapshot and last.pth (on the training thread; its writer thread overlaps the next
epoch); medians. Every rate is counted over whole epochs, timed after a warm-up epoch and with the device
synchronised at both ends, so no step's images or time is left out. Then: host syncs per epoch (the
sync-debug warnings only), NCHW<->NHWC conversion kernels (their names, not cuDNN's NHWC convolutions),
a CPU-made last.pth resumed here, --deterministic twice, peak GPU memory. What a CPU cannot show is "n/a".
The JSON is rewritten after each part, so a time-out keeps what was measured.
"""
import argparse
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tools"))

from gpu_check_report import GOALS  # noqa: E402
from smalldata import IMAGENET_MEAN, IMAGENET_STD, files, runtime, train  # noqa: E402
from smalldata.cli import Problems  # noqa: E402
from smalldata.data import load_images  # noqa: E402
from smalldata.folders import scan_labelled  # noqa: E402
from smalldata.keeper import Keeper  # noqa: E402
from smalldata.layout import RunPaths  # noqa: E402
from smalldata.settings import Candidates, Optimiser  # noqa: E402
from smalldata.train import (bn_chunk, make_loop, measure, precise_bn, restore_training_state,  # noqa: E402
                             train_epoch, training_state)


class Figures(dict):
    """What --json holds; written again (atomically) after every part."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def part(self, name, fn):
        """Run one part, keep its figures (or its error) under `name`; True when it worked."""
        try:
            self[name] = fn()
            ok = True
        except Exception as e:  # report and go on: one run should show every part
            self[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            ok = False
        print(f"{name:28s} {self[name]}", flush=True)
        if self.path:
            files.write_json(self.path, dict(self))
        return ok


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(seconds, result) of fn(), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def loop_for(args, device, amp, classes, swa=False, compile=False, batch_size=None):
    model = torchvision.models.get_model(args.arch, num_classes=classes)
    return make_loop(model, Optimiser(lr=1e-4, batch_size=batch_size or args.batch_size), device, amp, IMAGENET_MEAN,
                     IMAGENET_STD, compile=compile, candidates=Candidates(swa_epochs=5) if swa else None)


def repeat(x, y, n):
    """The first n of the images repeated until there are n (the recipe's counts from fewer photos)."""
    idx = torch.arange(n) % len(y)
    return x[idx], y[idx]


def images(args, device):
    """(train x, y, originals x, y, val x, y, classes) on the device, at the sizes asked for."""
    samples, classes = scan_labelled(args.images)
    x, y, *_ = load_images(samples, args.img_size, Problems())
    val_samples, _ = scan_labelled(args.val or args.images, classes)
    vx, vy, *_ = load_images(val_samples, args.img_size, Problems())
    (x, y), (ox, oy), (vx, vy) = repeat(x, y, args.train), repeat(x, y, args.originals), repeat(vx, vy, args.val_n)
    return [t.to(device) for t in (x, y, ox, oy, vx, vy)] + [classes]


def breakdown(args, figures):
    device, amp = runtime.setup("auto", seed=0)
    x, y, ox, oy, vx, vy, classes = images(args, device)
    loop = loop_for(args, device, amp, len(classes), swa=True)
    chunk = args.bn_chunk or bn_chunk(args.img_size)
    steps = len(y) // args.batch_size
    print(f"{runtime.describe(device, amp)}; {args.arch} at {args.img_size} px, batch {args.batch_size}: "
          f"{len(y)} training images ({steps} steps), {len(oy)} originals, {len(vy)} val", flush=True)
    train_epoch(loop, x, y, "warm-up")
    figures.part("bare", lambda: bare_epochs(args, loop, x, y, steps))
    figures.part("whole epochs", lambda: whole_epochs(args, loop, (x, y), (ox, oy), (vx, vy), chunk, figures))
    figures.part("host syncs", lambda: host_syncs(loop, x, y))
    figures.part("layout conversions", lambda: conversion_kernels(loop, x, y))
    figures.part("CPU last.pth resumed here", lambda: cpu_state_resumed_here(args, device, amp, len(classes), x, y))
    figures.part("--deterministic twice", lambda: deterministic_twice(args, device, amp, len(classes), x, y))
    if device.type == "cuda":
        figures.part("peak GPU memory", lambda: {"GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)})


def bare_epochs(args, loop, x, y, steps):
    seconds = [timed(loop.device, lambda: train_epoch(loop, x, y, "bare"))[0] for _ in range(args.epochs)]
    return {"images/s": round(steps * args.batch_size / statistics.median(seconds), 1),
            "epoch seconds": round(statistics.median(seconds), 3)}


def whole_epochs(args, loop, train_set, originals, val, chunk, figures):
    """Stage 1's epoch, part by part (stage.train_epochs: train, measure, keep, save; the SWA mean and its
    precise BN as --candidates-each-epoch adds them); medians in seconds."""
    swa = loop.averages["swa"]
    data = {"train": train_set, "orig": originals, "val": val}
    parts = {name: [] for name in ("train", "SWA mean", "precise BN", "eval", "keeper", "whole")}
    with tempfile.TemporaryDirectory() as tmp:
        meta = dict(arch=args.arch, classes=[str(i) for i in range(int(train_set[1].max()) + 1)],
                    img_size=args.img_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), args={})
        keeper = Keeper(RunPaths(Path(tmp), "stage1", Path(tmp)), meta)
        for epoch in range(1, args.epochs + 1):
            t_train, aug = timed(loop.device, lambda: train_epoch(loop, *train_set, "whole epoch"))
            t_swa, _ = timed(loop.device, lambda: swa.prepare(keeper.weights(epoch, loop.model), epoch))
            t_bn, _ = timed(loop.device, lambda: (precise_bn(loop, originals[0], chunk=chunk),
                                                  precise_bn(loop, originals[0], swa.model, chunk=chunk)))
            loop.precise_bn = False  # measure() below evaluates only: its precise BN was timed above
            t_eval, row = timed(loop.device, lambda: measure(loop, data, epoch, t_train, aug))
            loop.precise_bn = True
            t_keep, _ = timed(loop.device, lambda: (
                keeper.snapshot(loop.model, row, needed=swa.held(epoch)),
                keeper.save_last(epoch, lambda optimizer: training_state(loop, [row], {}, optimizer))))
            each = (t_train, t_swa, t_bn, t_eval, t_keep)
            for name, seconds in zip(parts, (*each, sum(each))):
                parts[name].append(seconds)
        t_flush, _ = timed(loop.device, keeper.close)
    median = {name: round(statistics.median(s), 3) for name, s in parts.items()}
    bare = figures.get("bare", {}).get("epoch seconds")
    return {"seconds per epoch": median, "images/s": round(len(train_set[1]) / median["whole"], 1),
            "whole / bare": round(bare / median["whole"], 3) if bare else None,
            "precise BN": f"{'one pass' if len(originals[1]) <= chunk else 'one pass per layer'} "
                          f"({len(originals[1])} originals, {chunk} per pass), for the weights and the SWA mean",
            "keeper's writer after the last epoch, s": round(t_flush, 3), "epochs": args.epochs}


def host_syncs(loop, x, y):
    """Synchronising CUDA calls in one training epoch, from torch's sync-debug warnings (other warnings aside);
    the progress bar's once-a-second read switched off."""
    if loop.device.type != "cuda":
        return "n/a on CPU"
    every, train.BAR_EVERY_S = train.BAR_EVERY_S, float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_epoch(loop, x, y, "sync check")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            train.BAR_EVERY_S = every
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"per epoch": len(syncs), "steps": len(y) // loop.batch_size, "expected": 2}


CONVERSION = re.compile(r"nchw_?to_?nhwc|nhwc_?to_?nchw", re.IGNORECASE)  # layout transposes, not NHWC convolutions


def conversion_kernels(loop, x, y):
    if loop.device.type != "cuda":
        return "n/a on CPU"
    from torch.profiler import ProfilerActivity, profile

    n = 4 * loop.batch_size
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_epoch(loop, x[:n], y[:n], "profile")
    found = {e.key: e.count for e in prof.key_averages() if CONVERSION.search(e.key)}
    return {"launches in 4 steps": sum(found.values()), "kernels": sorted(found)[:5]}


def cpu_state_resumed_here(args, device, amp, classes, x, y):
    """A last.pth made on a CPU (one step of two images: Adam's state has the weights' shapes whatever the
    batch) continued on this device."""
    cpu = loop_for(args, torch.device("cpu"), None, classes, batch_size=2)
    train_epoch(cpu, x[:2].cpu(), y[:2].cpu(), "cpu")
    state = training_state(cpu, [], {})
    state["rng"]["cuda"] = None
    here = loop_for(args, device, amp, classes)
    here.model.load_state_dict(cpu.model.state_dict())
    restore_training_state(here, state)
    loss = train_epoch(here, x, y, "resumed", steps=2)[0]
    return {"resumed and stepped": loss == loss}


def deterministic_twice(args, device, amp, classes, x, y):
    losses = []
    for _ in range(2):
        runtime.setup(device.type, seed=0, deterministic=True)  # the same seeds, then the same run
        losses.append(train_epoch(loop_for(args, device, amp, classes), x, y, "deterministic", steps=4)[0])
    torch.use_deterministic_algorithms(False)
    return {"losses": losses, "identical": losses[0] == losses[1]}


def compiled(args, figures):
    import torch._dynamo

    device, amp = runtime.setup("auto", seed=0)
    x, y, *_, classes = images(args, device)
    torch._dynamo.reset()
    loop = loop_for(args, device, amp, len(classes), compile=args.backend == "inductor")
    if args.backend != "inductor":  # the same step through dynamo, without inductor's code generation
        loop.step_model = torch.compile(loop.model, backend=args.backend)
    steps = len(y) // args.batch_size

    def run():
        first, _ = timed(device, lambda: train_epoch(loop, x, y, "compile 1"))
        second, _ = timed(device, lambda: train_epoch(loop, x, y, "compile 2"))
        return {"backend": args.backend, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                "first epoch s": round(first, 1),
                "then images/s": round(steps * args.batch_size / second, 1)}
    figures.part("torch.compile", run)


def setup(args, figures):
    """Versions and the device; with a GPU, tools/gpu_setup.py's check that torch and onnxruntime use it.
    Without one the step fails, unless GPU_CHECK_ALLOW_CPU=1 (bench/gpu_check.sh's CPU run)."""
    import os

    import onnxruntime as ort

    def describe():
        gpu = torch.cuda.is_available()
        return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda build": torch.version.cuda,
                "device": torch.cuda.get_device_name() if gpu else "cpu", "onnxruntime": ort.__version__,
                "onnxruntime providers": ort.get_available_providers(),
                "bf16": gpu and torch.cuda.is_bf16_supported(including_emulation=False)}

    def gpu_check():
        if not torch.cuda.is_available():
            if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
                return "no GPU: the CPU run (GPU_CHECK_ALLOW_CPU=1)"
            raise RuntimeError("torch sees no GPU (GPU_CHECK_ALLOW_CPU=1 runs the check on the CPU)")
        import gpu_setup

        try:
            gpu_setup.check(cpu_onnxruntime=True)  # torch: stops, naming the fix, when it cannot use the GPU
        except SystemExit as e:
            raise RuntimeError(str(e.code)) from None
        try:  # onnxruntime: reported, not a stop (a bundle made with --cpu-onnxruntime runs BR on the CPU)
            gpu_setup.check(cpu_onnxruntime=False)
            ort_cuda = "works"
        except SystemExit as e:
            ort_cuda = f"no: {e.code}"
        return {"torch": "uses the GPU", "onnxruntime's CUDA provider": ort_cuda}
    ok = figures.part("versions", describe)
    return figures.part("GPU", gpu_check) and ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["setup", "breakdown", "compile"])
    p.add_argument("--images", type=Path, help="<class>/<image> folders of training photos")
    p.add_argument("--val", type=Path, help="validation photos (default: --images)")
    p.add_argument("--arch", default="vgg13_bn")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train", type=int, default=1100, help="training images per epoch")
    p.add_argument("--originals", type=int, default=275, help="training originals (precise BN, train_acc)")
    p.add_argument("--val-n", type=int, default=200, help="validation images")
    p.add_argument("--bn-chunk", type=int, help="images per precise-BN pass (default: the stage's, by image size)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each kind (medians)")
    p.add_argument("--backend", default="inductor",
                   help="compile: torch.compile's backend (aot_eager: dynamo's graphs without inductor's code "
                        "generation, which takes minutes on a small CPU)")
    p.add_argument("--json", type=Path, help="write the figures here, after every part")
    args = p.parse_args()
    if args.part != "setup" and not args.images:
        p.error(f"{args.part} needs --images")
    print(f"goal: {GOALS}", flush=True)
    figures = Figures(args.json)
    ok = {"setup": setup, "breakdown": breakdown, "compile": compiled}[args.part](args, figures)
    failed = [name for name, value in figures.items() if isinstance(value, dict) and "error" in value]
    return 1 if failed or ok is False else 0


if __name__ == "__main__":
    sys.exit(main())

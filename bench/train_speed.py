"""Training throughput: the project's training step against the usual torchvision way, in one run.

    python bench/train_speed.py --images data/train            # CPU: 64 px, batch 16
    python bench/train_speed.py --images PHOTOS --pipeline     # GPU: 256 px, batch 64; also time the demo

Ours: images decoded once into a uint8 tensor on the device, augmented there (one grid_sample
per batch), bf16 autocast, channels_last, fused Adam: smalldata.train.train_epoch itself.
Baseline: torchvision.datasets.ImageFolder + PIL transforms + DataLoader, fp32, NCHW, no
caching, as in torchvision's classification tutorial. Same model, image size, batch size,
device, images and optimizer (Adam); warm-up steps are excluded from both timings.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata import IMAGENET_MEAN, IMAGENET_STD, runtime  # noqa: E402
from smalldata.cli import Problems  # noqa: E402
from smalldata.data import load_images  # noqa: E402
from smalldata.folders import scan_labelled  # noqa: E402
from smalldata.settings import Optimiser  # noqa: E402
from smalldata.train import make_loop, train_epoch  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s), from the vendors' data sheets.
BF16_PEAK = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def flops_per_image(arch, num_classes, img_size, device):
    """Forward + backward FLOPs of one training image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.get_model(arch, num_classes=num_classes).to(device)
    x = torch.randn(2, 3, img_size, img_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def bf16_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ours(args, device, amp, num_classes):
    samples, _ = scan_labelled(args.images)
    x, y, *_ = load_images(samples, args.img_size, Problems())
    reps = -(-args.steps * args.batch_size // len(y))  # tile the set so one epoch has enough steps
    x = x.repeat(reps, 1, 1, 1)[: args.steps * args.batch_size].to(device)
    y = y.repeat(reps)[: args.steps * args.batch_size].to(device)
    model = torchvision.models.get_model(args.arch, num_classes=num_classes)
    loop = make_loop(model, Optimiser(lr=1e-4, batch_size=args.batch_size), device, amp, IMAGENET_MEAN, IMAGENET_STD,
                     compile=args.compile)
    warm = args.warmup * args.batch_size
    train_epoch(loop, x[:warm], y[:warm], "warm-up")
    sync(device)  # every timed step counted, its images and its time: the whole epoch, synchronised at both ends
    start = time.perf_counter()
    train_epoch(loop, x, y, "ours")
    sync(device)
    return len(y) / (time.perf_counter() - start)


def bench_baseline(args, device, num_classes):
    tf = transforms.Compose([transforms.RandomResizedCrop(args.img_size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(args.images, transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    model = torchvision.models.get_model(args.arch, num_classes=num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def batches():
        while True:
            yield from loader

    it = batches()
    seen, start = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y) if step >= args.warmup else 0
    loss.item()
    sync(device)
    return seen / (time.perf_counter() - start)


def main():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", default=str(REPO / "data/train"), help="a <class>/<image> folder of photos")
    p.add_argument("--arch", default="vgg13_bn")
    p.add_argument("--img-size", type=int, default=256 if gpu else 64)
    p.add_argument("--batch-size", type=int, default=64 if gpu else 16)
    p.add_argument("--steps", type=int, default=100 if gpu else 12, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=15 if gpu else 2, help="untimed steps first")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="baseline DataLoader workers")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--pipeline", action="store_true", help="also time the five scripts on the demo data")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    device, amp = runtime.setup(args.device, seed=0)
    num_classes = len(scan_labelled(args.images)[1])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device {name}; {args.arch}, {args.img_size} px, batch {args.batch_size}, {num_classes} classes, "
          f"{args.steps} timed steps after {args.warmup} warm-up; images from {args.images}")

    ours = bench_ours(args, device, amp, num_classes)
    base = bench_baseline(args, device, num_classes)
    print(f"ours      {ours:9.1f} images/s  (in-memory uint8, on-device augmentation, "
          f"{'bf16' if amp == torch.bfloat16 else 'fp16' if amp else 'fp32'}, "
          f"{'channels_last' if device.type == 'cuda' else 'NCHW'}, fused Adam)")
    print(f"baseline  {base:9.1f} images/s  (ImageFolder + PIL transforms + DataLoader x{args.workers}, fp32, NCHW)")
    print(f"ratio     {ours / base:9.2f}x")
    flops = flops_per_image(args.arch, num_classes, args.img_size, device)
    peak = bf16_peak(device)
    line = f"model FLOPs per training image {flops / 1e9:.1f} GFLOP; ours achieves {ours * flops / 1e12:.1f} TFLOP/s"
    print(line + (f" = {100 * ours * flops / 1e12 / peak:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""))
    if args.json:
        args.json.write_text(json.dumps({"ours images/s": round(ours, 1), "baseline images/s": round(base, 1),
                                         "ours / baseline": round(ours / base, 2),
                                         "TFLOP/s": round(ours * flops / 1e12, 1)}, indent=1))

    if args.pipeline:
        sys.path.insert(0, str(REPO / "tools"))
        import demo

        kind = "gpu" if device.type == "cuda" else "cpu"
        timings = demo.run_pipeline(demo.CONFIGS[kind], REPO / "data", REPO / "checkpoints", "none")
        print(f"\nwhole pipeline on the demo data ({kind} configuration, {name}):")
        for step, seconds, code in timings:
            print(f"  {step:22s} {seconds:8.1f} s   exit {code}")
        print(f"  {'total':22s} {sum(t for _, t, _ in timings):8.1f} s")


if __name__ == "__main__":
    main()

"""Start-up, memory and throughput as the data set grows: decode cache, in-memory and streaming modes.

Makes synthetic JPEG trees (smooth random colour fields with shapes, about 500x375 px, 10 classes)
of each --sizes photos in a temporary folder, then for each size runs three fresh processes on the
same code the training stages use (data.load_training_data, train.train_epoch):

  first run   cache deleted: every photo decoded and the cache written (--data-on device)
  in memory   cache present: start-up from the cache, the whole set in RAM (--data-on device)
  streaming   cache present: start-up from the cache, batches gathered from its memory map (--data-on stream)

and prints, per run: start-up seconds (load_training_data), training images/s over --steps steps
(--arch at --img-size, batch --batch-size), peak RSS (VmHWM: includes the memory map's pages the
process touched, which the kernel can drop at any time) and peak anonymous memory (RssAnon, sampled
every 20 ms: the memory the process itself holds).

    python bench/scale.py --sizes 1000 10000 50000
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000], help="training photos per tree")
    p.add_argument("--val", type=int, default=200, help="validation photos per tree")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="training steps timed per run")
    p.add_argument("--work", type=Path, help="keep the trees here (default: a temporary folder, deleted)")
    p.add_argument("--child", nargs=2, metavar=("ROOT", "MODE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_tree(root, n, classes=10, seed=0):
    """n photos in root/<class>/, each a smooth colour field with a class-coloured ellipse."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC)
        x, y = rng.integers(50, 300), rng.integers(40, 200)
        ImageDraw.Draw(img).ellipse((x, y, x + 150, y + 120), fill=tuple(int(v) for v in (25 * c, 255 - 25 * c, 128)))
        img.save(folder / f"{i:06d}.jpg", quality=85)


def peak_anon_sampler():
    """Start a thread that records the peak RssAnon (kB) of this process; returns a getter."""
    peak = [0]

    def sample():
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return lambda: peak[0]


def child(root, mode, args):
    """One measured run in this fresh process; prints one JSON line."""
    anon = peak_anon_sampler()
    import torch
    import torchvision

    from smalldata import IMAGENET_MEAN, IMAGENET_STD
    from smalldata.cli import Problems
    from smalldata.data import load_training_data
    from smalldata.train import make_loop, train_epoch

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    data = load_training_data(root, args.img_size, Problems(), use_br=False, use_ocm=False, device=cpu,
                              data_on=mode, cache_dir=root / "cache")
    start = time.perf_counter() - t0
    model = torchvision.models.get_model(args.arch, num_classes=len(data["classes"]))
    loop = make_loop(model, lr=1e-4, weight_decay=0.0, device=cpu, amp=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     batch_size=args.batch_size, seed=0)
    train_epoch(loop, *data["train"], desc="warm-up", steps=3)
    ips = train_epoch(loop, *data["train"], desc=mode, steps=args.steps)[2]
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"start_s": start, "how": data["how"]["train"], "ips": ips, "peak_rss_mb": hwm / 1024,
                      "peak_anon_mb": anon() / 1024, "where": data["where"]}))


def run_child(root, mode, args):
    cmd = [sys.executable, __file__, "--child", str(root), mode, "--img-size", str(args.img_size), "--arch", args.arch,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    args = get_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1], args)
    work = args.work or Path(tempfile.mkdtemp(prefix="smalldata-scale-"))
    print(f"{args.arch} at {args.img_size} px, batch {args.batch_size}, {args.steps} timed steps; CPU; trees in {work}")
    header = f"{'photos':>7} {'run':10} {'start s':>8} {'images/s':>9} {'peak RSS MB':>12} {'peak anon MB':>13}  how"
    print(header)
    rows = []
    try:
        for n in args.sizes:
            root = work / f"tree_{n}"
            if not (root / "train").is_dir():
                t0 = time.perf_counter()
                write_tree(root / "train", n)
                write_tree(root / "val", args.val, seed=1)
                print(f"  (wrote {n} + {args.val} JPEGs in {time.perf_counter() - t0:.0f} s)", flush=True)
            shutil.rmtree(root / "cache", ignore_errors=True)
            for label, mode in (("first run", "device"), ("in memory", "device"), ("streaming", "stream")):
                r = run_child(root, mode, args)
                rows.append({"photos": n, "run": label, **r})
                print(f"{n:7d} {label:10} {r['start_s']:8.2f} {r['ips']:9.1f} {r['peak_rss_mb']:12.0f} "
                      f"{r['peak_anon_mb']:13.0f}  {r['how']}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nper size: cached start-up speed-up over decoding; streaming images/s as a share of in-memory")
    for n in args.sizes:
        r = {x["run"]: x for x in rows if x["photos"] == n}
        print(f"{n:7d} photos: start-up {r['first run']['start_s'] / r['in memory']['start_s']:6.1f}x faster "
              f"from the cache ({r['streaming']['start_s']:.2f} s streaming); streaming "
              f"{r['streaming']['ips'] / r['in memory']['ips']:.0%} of in-memory images/s; peak anon "
              f"{r['in memory']['peak_anon_mb']:.0f} MB in memory, {r['streaming']['peak_anon_mb']:.0f} MB streaming")


if __name__ == "__main__":
    main()

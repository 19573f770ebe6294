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
    python bench/scale.py --sizes 10000 --workers 1 3       # peak memory of each torchrun worker
    python bench/scale.py --allreduce --arch vgg13_bn        # step time against the number of workers

--workers: the in-memory start-up again under torchrun with N CPU workers (gloo), each loading the set
as a training worker does (--data-on device), with every worker's peak RSS and anonymous memory.
--allreduce: measures gloo's all-reduce of the model's float32 gradients with 2 and 3 CPU workers and
one CPU training step per image count, then estimates the step time of a global batch shared by W
workers: compute(batch / W) + all-reduce(W), the all-reduce from the ring algorithm's 2 (W - 1) / W
of the gradient bytes at the measured rate. On GPUs both terms are far smaller; the shape is what
it shows: past some W, a small global batch is slower per step than on one worker.
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
    p.add_argument("--workers", type=int, nargs="+", help="also measure in-memory start-up under torchrun with N workers")
    p.add_argument("--allreduce", action="store_true", help="only the all-reduce estimate (no trees)")
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
    from smalldata.settings import Optimiser
    from smalldata.train import make_loop, train_epoch

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    data = load_training_data(root, args.img_size, Problems(), use_br=False, use_ocm=False, device=cpu,
                              data_on="device" if mode == "workers" else mode, cache_dir=root / "cache")
    start = time.perf_counter() - t0
    if mode == "workers":  # under torchrun: only what each worker holds after loading
        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(json.dumps({"rank": int(__import__("os").environ.get("RANK", 0)), "start_s": start,
                          "peak_rss_mb": hwm / 1024, "peak_anon_mb": anon() / 1024}), flush=True)
        return
    model = torchvision.models.get_model(args.arch, num_classes=len(data["classes"]))
    loop = make_loop(model, Optimiser(lr=1e-4, batch_size=args.batch_size), cpu, None, IMAGENET_MEAN, IMAGENET_STD)
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


def run_workers(root, n, args):
    """Every worker's numbers of an in-memory start-up under torchrun with n CPU workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--child", str(root), "workers", "--img-size", str(args.img_size), "--arch", args.arch]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(__import__("os").environ,
                                                                                   OMP_NUM_THREADS="1")).stdout
    return sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def allreduce_child(args):
    """Under torchrun: seconds of one all-reduce of the model's float32 gradients (median of 3)."""
    import torch
    import torch.distributed as dist
    import torchvision

    dist.init_process_group("gloo")
    n = sum(p.numel() for p in torchvision.models.get_model(args.arch, num_classes=10).parameters())
    grads = torch.ones(n)
    times = []
    for _ in range(4):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"bytes": 4 * n, "seconds": sorted(times[1:])[1]}), flush=True)
    dist.destroy_process_group()


def allreduce_estimate(args):
    import torch
    import torchvision

    measured = {}
    for w in (2, 3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}", __file__,
               "--child", "-", "allreduce", "--arch", args.arch]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=dict(__import__("os").environ, OMP_NUM_THREADS="1")).stdout
        measured[w] = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    # ring all-reduce moves 2 (W - 1) / W of the bytes through each worker: the rate per worker it implies
    rate = statistics_mean([m["bytes"] * 2 * (w - 1) / w / m["seconds"] for w, m in measured.items()])
    model = torchvision.models.get_model(args.arch, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    per_image = {}
    for b in (args.batch_size, max(1, args.batch_size // 8)):
        x, y = torch.randn(b, 3, args.img_size, args.img_size), torch.randint(0, 10, (b,))
        for i in range(3):  # the first step warms up the allocator and kernels: not timed
            if i == 1:
                t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        per_image[b] = (time.perf_counter() - t0) / 2
    grad_bytes = measured[2]["bytes"]
    print(f"{args.arch}: {grad_bytes / 2**20:.0f} MB of float32 gradients; gloo all-reduce measured "
          + ", ".join(f"{m['seconds']:.2f} s with {w} workers" for w, m in measured.items())
          + f" (ring: {rate / 2**30:.2f} GiB/s per worker)")
    print(f"step of a global batch {args.batch_size} at {args.img_size} px, estimated from this CPU's compute "
          f"({per_image[args.batch_size]:.2f} s for {args.batch_size} images, "
          f"{per_image[max(1, args.batch_size // 8)]:.2f} s for {max(1, args.batch_size // 8)}):")
    small, big = max(1, args.batch_size // 8), args.batch_size
    slope = (per_image[big] - per_image[small]) / (big - small)  # seconds per image, with a fixed cost apart
    fixed = per_image[big] - slope * big
    for w in (1, 2, 4, 8, 16):
        compute = fixed + slope * args.batch_size / w
        comm = 0.0 if w == 1 else grad_bytes * 2 * (w - 1) / w / rate
        print(f"  {w:3d} workers: compute {compute:6.2f} s + all-reduce {comm:6.2f} s = {compute + comm:6.2f} s "
              f"({args.batch_size / w:.0f} images each)")


def statistics_mean(values):
    return sum(values) / len(values)


def main():
    args = get_args()
    if args.child and args.child[1] == "allreduce":
        return allreduce_child(args)
    if args.child:
        return child(Path(args.child[0]), args.child[1], args)
    if args.allreduce:
        return allreduce_estimate(args)
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
            for w in args.workers or []:
                for r in run_workers(root, w, args):
                    print(f"{n:7d} {f'{w} workers':10} {r['start_s']:8.2f} {'-':>9} {r['peak_rss_mb']:12.0f} "
                          f"{r['peak_anon_mb']:13.0f}  rank {r['rank']}, in memory", flush=True)
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

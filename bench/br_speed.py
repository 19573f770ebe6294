"""Speed of make_remove_background.py against rembg's own folder command, `rembg p`.

Both get the same real photos (a class-spread subset of --photos) and the same model, in the same
process environment. What is timed, for both alike: the whole command, wall clock, from start to
exit -- interpreter start, imports, model load, every image decoded, masked, composited,
encoded and written. Nothing is excluded from either. `rembg p` needs a flat folder, so the
subset is copied twice: flat (class-prefixed names) for it, and as class folders for ours.
Rounds alternate which command goes first, so drifting load on a shared machine hits both.

    python bench/br_speed.py --limit 60 --rounds 2
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata.images import list_files  # noqa: E402
from smalldata.rembg_models import model_home  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "datasets" / "oxford17flowers",
                   help="a folder of <class>/<image> photos")
    p.add_argument("--limit", type=int, default=60, help="how many photos, spread over the classes")
    p.add_argument("--model", default="u2netp", help="rembg model for both commands")
    p.add_argument("--rounds", type=int, default=2, help="runs of each command (order alternates)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders and print where")
    p.add_argument("extra", nargs="*", help="extra flags for make_remove_background.py, after --")
    return p.parse_args()


def subset(photos, limit):
    """Round-robin over the classes: the first photo of each class, then the second, ..."""
    per_class = [list_files(d) for d in sorted(photos.iterdir()) if d.is_dir()]
    picked = []
    for i in range(max(map(len, per_class))):
        picked += [(files[0].parent.name, files[i]) for files in per_class if i < len(files)]
    return picked[:limit]


def timed(cmd, env):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc


def main():
    args = get_args()
    if not args.photos.is_dir():
        sys.exit(f"--photos {args.photos}: folder not found")
    rembg = Path(sys.executable).parent / "rembg"
    model_home()  # U2NET_HOME for both commands: they read the same model file
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    picked = subset(args.photos, args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="br_speed-"))
    flat, tree = tmp / "flat", tmp / "tree"
    flat.mkdir()
    for cls, path in picked:
        shutil.copy(path, flat / f"{cls}__{path.name}")
        (tree / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tree / cls / path.name)
    n = len(picked)
    print(f"{n} photos from {args.photos} ({len({c for c, _ in picked})} classes), model {args.model}, "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")

    commands = {
        "rembg p": [str(rembg), "p", "-m", args.model, str(flat), str(tmp / "out_rembg")],
        "ours": [sys.executable, str(REPO / "make_remove_background.py"), "--src", str(tree),
                 "--dst", str(tmp / "out_ours"), "--model", args.model, "--overwrite", *args.extra],
    }
    print("timed (whole command, wall clock):")
    for name, cmd in commands.items():
        print(f"  {name:8s} {' '.join(cmd)}")
    rates = {name: [] for name in commands}
    for r in range(args.rounds):
        order = list(commands) if r % 2 == 0 else list(commands)[::-1]
        for name in order:
            shutil.rmtree(tmp / ("out_rembg" if name == "rembg p" else "out_ours"), ignore_errors=True)
            seconds, proc = timed(commands[name], env)
            out = tmp / ("out_rembg" if name == "rembg p" else "out_ours")
            written = sum(1 for p in out.rglob("*.png"))
            if written != n:
                sys.exit(f"{name} wrote {written} of {n} images:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            rates[name].append(n / seconds)
            note = next((ln for ln in proc.stdout.splitlines() if ln.startswith("summary:")), "")
            print(f"round {r + 1} {name:8s} {seconds:6.1f} s  {n / seconds:5.2f} images/s  {note[:60]}")

    ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["rembg p"])
    print(f"\nmedian over {args.rounds} round(s): ours {ours:.2f} images/s, rembg p {theirs:.2f} images/s, "
          f"ratio {ours / theirs:.2f}x  (load average now {os.getloadavg()[0]:.2f})")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

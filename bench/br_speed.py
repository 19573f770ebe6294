"""Speed of make_remove_background.py against rembg's own folder command, `rembg p`.

Both get the same real photos (a class-spread subset of --photos) and the same model, in the same
process environment. Two rates, each measured the same way for both:
  end to end: images / wall seconds of the whole command -- interpreter start, imports, model
              load, every image decoded, masked, composited, encoded and written;
  steady:     (images - 1) / seconds between the first and the last output file's mtime, so
              start-up, model load and the first image are excluded from both.
`rembg p` needs a flat folder, so the
subset is copied twice: flat (class-prefixed names) for it, and as class folders for ours.
Rounds alternate which command goes first, so drifting load on a shared machine hits both; CPU
seconds (all threads of the command) are printed too, as they vary less with load than wall time.
Last, the bare model's inference rate on all cores is measured: the ceiling both commands run under.
Ours runs with --fallback copy so that both write every photo (a photo without a found object gets
its original written instead of being skipped; the inference is done either way).

    python bench/br_speed.py --limit 60 --rounds 3 [--rembg-deps DIR] [-- --threads 2]
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata.folders import list_files  # noqa: E402
from smalldata.rembg_api import find_model  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--photos", type=Path, required=True,
                   help="a folder of <class>/<image> photos")
    p.add_argument("--limit", type=int, default=60, help="how many photos, spread over the classes")
    p.add_argument("--model", default="u2netp", help="rembg model for both commands")
    p.add_argument("--rounds", type=int, default=3, help="runs of each command (order alternates)")
    p.add_argument("--rembg-deps", type=Path, default=None,
                   help="folder with rembg's CLI extra (pip install --target DIR 'rembg[cli]' deps), "
                        "put on PYTHONPATH for `rembg p` only; not needed when the venv has rembg[cli]")
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


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd, env):
    """Wall seconds and CPU seconds (all threads) of one whole command."""
    t0, c0 = time.perf_counter(), child_cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, child_cpu() - c0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, cpu, proc


def inference_ceiling(model, seconds=10.0):
    """Images/s of the bare ONNX model on a fixed 320 px input, using every core (two sessions of
    cpu_count/2 threads each, run concurrently, as ours does): no decode, resize, mask or encode.
    No folder command can be faster than this; it is what the two are measured against."""
    import threading

    import numpy as np
    import onnxruntime as ort

    path = find_model(model)
    if path is None:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, (os.cpu_count() or 2) // 2)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    session.run(None, {inp.name: x})
    done, stop = [], time.perf_counter() + seconds

    def work():
        while time.perf_counter() < stop:
            session.run(None, {inp.name: x})
            done.append(1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / (time.perf_counter() - t0)


def main():
    args = get_args()
    if not args.photos.is_dir():
        sys.exit(f"--photos {args.photos}: folder not found")
    rembg = Path(sys.executable).parent / "rembg"
    find_model(args.model)  # U2NET_HOME for both commands where needed: they read the same model file
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    rembg_env = dict(env)
    if args.rembg_deps:
        rembg_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.rembg_deps), env.get("PYTHONPATH")]))
    check = subprocess.run([sys.executable, "-c", "import rembg.cli"], env=rembg_env, capture_output=True, text=True)
    if check.returncode != 0 or "not installed" in check.stdout:
        sys.exit("`rembg p` cannot run: rembg's CLI extra is missing. Install it (pip install 'rembg[cli]'), "
                 "or put its packages in a folder (pip install --target DIR click filetype watchdog aiohttp "
                 "uvicorn fastapi asyncer python-multipart) and pass --rembg-deps DIR")
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

    outs = {"rembg p": tmp / "out_rembg", "ours": tmp / "out_ours"}
    commands = {
        "rembg p": [str(rembg), "p", "-m", args.model, str(flat), str(outs["rembg p"])],
        "ours": [sys.executable, str(REPO / "make_remove_background.py"), "--src", str(tree),
                 "--dst", str(outs["ours"]), "--model", args.model, "--fallback", "copy", *args.extra],
    }
    print("commands:")
    for name, cmd in commands.items():
        print(f"  {name:8s} {' '.join(cmd)}")
    print("end to end = images / wall seconds of the whole command (start-up and model load included);\n"
          "steady = (images - 1) / seconds from the first output file to the last (both excluded)")
    rates = {name: {"end to end": [], "steady": []} for name in commands}
    for r in range(args.rounds):
        order = list(commands) if r % 2 == 0 else list(commands)[::-1]
        for name in order:
            shutil.rmtree(outs[name], ignore_errors=True)
            seconds, cpu, proc = timed(commands[name], rembg_env if name == "rembg p" else env)
            written = sorted(p.stat().st_mtime for p in outs[name].rglob("*.png"))
            if len(written) != n:
                sys.exit(f"{name} wrote {len(written)} of {n} images:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            steady = (n - 1) / (written[-1] - written[0])
            rates[name]["end to end"].append(n / seconds)
            rates[name]["steady"].append(steady)
            print(f"round {r + 1} {name:8s} {seconds:5.1f} s: end to end {n / seconds:4.2f} images/s, steady "
                  f"{steady:4.2f} images/s, {cpu:5.1f} CPU s ({cpu / n:.3f} per image), "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

    print(f"\nmedian over {args.rounds} round(s), {n} images, model {args.model}:")
    for kind in ("end to end", "steady"):
        ours, theirs = (statistics.median(rates[k][kind]) for k in ("ours", "rembg p"))
        print(f"  {kind:10s}  ours {ours:.2f} images/s, rembg p {theirs:.2f} images/s, ratio {ours / theirs:.2f}x")
    ceiling = inference_ceiling(args.model)
    if ceiling:
        best = statistics.median(rates["rembg p"]["steady"])
        print(f"  ceiling     {args.model} inference alone (320 px input, all cores) {ceiling:.2f} images/s: "
              f"at most {ceiling / best:.2f}x rembg p's steady rate; ours reaches "
              f"{100 * statistics.median(rates['ours']['steady']) / ceiling:.0f}% of it")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

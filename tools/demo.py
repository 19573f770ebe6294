"""Run the five scripts in order on data/ and print the score (quick start 1 ends here).

    python tools/demo.py              # GPU: the real configuration; CPU: a small one
    python tools/demo.py --small      # the small configuration even on a GPU

Each script skips work that is already done, so a second run is quick.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The real recipe on a GPU, and a configuration that finishes in minutes on 2 CPU cores.
# Fashion-MNIST photos are 28 px, so 32 px loses nothing on the CPU.
CONFIGS = {
    "gpu": {"img_size": 256, "ocm_count": 500, "epochs1": 100, "epochs2": 20, "batch_size": 32},
    "cpu": {"img_size": 32, "ocm_count": 300, "epochs1": 6, "epochs2": 3, "batch_size": 32},
}


def imagenet_weights_ready(arch="vgg13_bn"):
    """True when torchvision's ImageNet weights are cached or can be downloaded now."""
    import torch

    from smalldata.model import imagenet_available, imagenet_weights

    if imagenet_available(arch):
        return True
    try:
        torch.hub.load_state_dict_from_url(imagenet_weights(arch).url, progress=True)
        return True
    except Exception as e:  # no network: train from scratch, and say so
        print(f"note: ImageNet weights cannot be had ({type(e).__name__}); training from scratch (--weights none)")
        return False


def steps(cfg, data, out, weights):
    py = [sys.executable]
    return [
        # The demo's garments are light on black: on the default white they would vanish, so each photo
        # gets the plain colour farthest from its own (--bg-color auto). Tiny 28 px photos where u2netp
        # finds no object in, or is unsure of, are copied as they are (--fallback copy) and named.
        ("background removal", py + [REPO / "make_remove_background.py", "--src", data / "train",
                                     "--dst", data / "br", "--model", "u2netp", "--fallback", "copy",
                                     "--bg-color", "auto", "--preview", out / "br_preview.png"]),
        ("one-class cutmix", py + [REPO / "make_cutmix.py", "--src", data / "train", "--dst", data / "ocm",
                                   "--count", cfg["ocm_count"], "--img-size", cfg["img_size"],
                                   "--preview", out / "ocm_preview.png"]),
        ("stage 1 (lr 1e-4)", py + [REPO / "model_1e-4.py", "--data", data, "--out", out, "--weights", weights,
                                    "--img-size", cfg["img_size"], "--epochs", cfg["epochs1"],
                                    "--batch-size", cfg["batch_size"]]),
        ("stage 2 (lr 1e-7)", py + [REPO / "model_1e-7_ep20.py", "--data", data, "--out", out,
                                    "--init", out / "divergence.pth", "--epochs", cfg["epochs2"],
                                    "--batch-size", cfg["batch_size"]]),
        ("score", py + [REPO / "check_score.py", "--checkpoint", out / "final.pth", "--data", data / "val",
                        "--out", out / "score"]),
    ] + ([  # val chose the epochs, so its score flatters; the hold-out test split is the fair number
        ("score (test)", py + [REPO / "check_score.py", "--checkpoint", out / "final.pth", "--data",
                               data / "test", "--out", out / "score-test"]),
    ] if (data / "test").is_dir() else [])


def run_pipeline(cfg, data, out, weights):
    """Run every step; returns [(name, seconds, exit code)]. Stops at an exit code of 2."""
    timings = []
    for name, cmd in steps(cfg, Path(data), Path(out), weights):
        print(f"\n===== {name}: {' '.join(str(c) for c in cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([str(c) for c in cmd])
        timings.append((name, time.perf_counter() - t0, code))
        if code not in (0, 1):
            print(f"{name} failed with exit code {code}; stopping", file=sys.stderr)
            break
    return timings


def top1_line(name, score_json, where):
    s = json.loads(Path(score_json).read_text())
    return f"{name} Top-1 accuracy: {100 * s['top1']:.2f}% ({s.get('correct', '?')}/{s['n']}) {where}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data")
    p.add_argument("--out", default="checkpoints")
    p.add_argument("--small", action="store_true", help="the CPU configuration even on a GPU")
    args = p.parse_args()
    import torch

    kind = "gpu" if torch.cuda.is_available() and not args.small else "cpu"
    cfg = CONFIGS[kind]
    print(f"demo configuration ({kind}): {cfg}")
    weights = "imagenet" if imagenet_weights_ready() else "none"
    timings = run_pipeline(cfg, args.data, args.out, weights)

    print("\n===== timings")
    for name, seconds, code in timings:
        print(f"{name:22s} {seconds:8.1f} s   exit {code}")
    print(f"{'total':22s} {sum(t for _, t, _ in timings):8.1f} s")
    score = Path(args.out) / "score" / "score.json"
    if not score.exists() or any(code not in (0, 1) for _, _, code in timings):
        return 2
    print()
    print(top1_line("Validation", score, f"on {args.data}/val with {args.out}/final.pth"))
    test = Path(args.out) / "score-test" / "score.json"
    if test.exists():
        print(top1_line("Hold-out test", test, f"on {args.data}/test (never seen in training or model selection)"))
    out = args.out
    print(f"look at: {out}/br_preview.png (each photo beside its BR image: does BR keep the object?), "
          f"{out}/ocm_preview.png (base, patch, mix)")
    print(f"checkpoints: {out}/divergence.pth, {out}/final.pth (1e-4/last.pth, 1e-7/last.pth to resume)")
    print(f"metrics and plots: {out}/1e-4/metrics.csv, {out}/1e-4/curves.png, {out}/1e-4/divergence.json, "
          f"{out}/1e-7/metrics.csv, {out}/1e-7/curves.png")
    print(f"score details: {out}/score/, {out}/score-test/ (score.json, predictions.csv, per_class.csv, "
          "confusion.png, mistakes.png)")
    print("BR's effect is not measured by the demo: on these 28 px photos u2netp's masks are often faint or "
          "missing (see br_preview.png); bench/ablation.py compares runs with and without it on real photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())

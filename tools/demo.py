"""Run the recipe on the demo photos and show what it is for (quick start 1 ends here).

    python tools/demo.py              # GPU: the recipe's configuration; CPU: a small one
    python tools/demo.py --small      # the small configuration even on a GPU

The demo photos (tools/make_demo_data.py) are garments on backgrounds that mislead: in train, each
class sits mostly on its own kind of background; in val and test, backgrounds are random. The demo
removes the backgrounds (BR, measured against the true masks), makes One-class CutMix images, then
trains stage 1 twice with the same seed and the same number of optimiser steps: (a) on the originals
only and (d) on originals + BR + OCM, the recipe. Both are scored on the hold-out test photos, each
with its 95 % interval, and d - a as a paired difference on the same photos. Stage 2 and the two
scores of today run on the recipe's run. Every script's own output goes to <out>/demo_logs/; the
console gets a line per step and the summary. Each script skips work already done: a second run is quick.
"""
import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import make_demo_data  # noqa: E402

# The recipe on a GPU; on 2 CPU cores a configuration that finishes in minutes: resnet18 at 32 px
# (VGG-13-BN trains about 9 photos a second at 64 px on 2 cores: 25 epochs would take an hour), 10 epochs
# (the divergence rule only judges from epoch 10, so on a CPU it cannot fire: stage 1 then keeps its
# steady best-val epoch and says so; the 10-minute budget allows no more), and 2 epochs of stage 2.
CONFIGS = {
    "gpu": {"arch": "vgg13_bn", "img_size": 256, "ocm_per_photo": 2.5, "epochs1": 100, "epochs2": 20, "batch_size": 32},
    "cpu": {"arch": "resnet18", "img_size": 32, "ocm_per_photo": 2.0, "epochs1": 10, "epochs2": 2, "batch_size": 32},
}


def imagenet_weights_ready(arch):
    """True when torchvision's ImageNet weights are cached or can be downloaded now."""
    import torch

    from smalldata.model import imagenet_available, imagenet_weights

    if imagenet_available(arch):
        return True
    try:
        torch.hub.load_state_dict_from_url(imagenet_weights(arch).url, progress=False)
        return True
    except Exception as e:  # no network: train from scratch, and say so
        print(f"note: ImageNet weights for {arch} cannot be had ({type(e).__name__}); training from scratch")
        return False


def count_images(folder):
    from smalldata.folders import list_files

    return len([p for p in list_files(folder) if p.parent != Path(folder)]) if Path(folder).is_dir() else 0


def run_step(name, cmd, logs, timings):
    """Run one script with its output in logs/<name>.log; a line on the console. Stops the demo on an
    exit code other than 0 (done) and 1 (done, some inputs skipped), naming the step and its log."""
    log = logs / f"{name.replace(' ', '_')}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - t0
    timings.append((name, seconds, code))
    print(f"  {name:34s} {seconds:7.1f} s  exit {code}", flush=True)
    if code not in (0, 1):
        tail = "".join(open(log).readlines()[-15:])
        sys.exit(f"\nthe demo stopped: step '{name}' failed with exit code {code}; its output ({log}) ends:\n{tail}")
    return log


def correct_bits(score_dir):
    """Which test photos a scored checkpoint got right, in file order (from check_score's predictions.csv)."""
    with open(Path(score_dir) / "predictions.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    return [r["file"] for r in rows], [int(r["true"] == r["predicted"]) for r in rows]


def comparison(a_dir, d_dir, picture, steps):
    """(lines, numbers) of the side by side: each run's test top-1 with its Wilson interval, and d - a
    paired on the same photos (bootstrap over photos); draws the bars with intervals into `picture`."""
    from smalldata import intervals, plots

    (files_a, a), (files_d, d) = correct_bits(a_dir), correct_bits(d_dir)
    assert files_a == files_d, "the two runs must be scored on the same photos"
    n = len(a)
    rows = []
    for label, bits in (("(a) originals only", a), ("(d) originals + BR + OCM", d)):
        lo, hi = intervals.wilson(sum(bits), n)
        rows.append((label, 100 * sum(bits) / n, 100 * lo, 100 * hi))
    diff, lo, hi = intervals.bootstrap([d], [a])
    verdict = ("the recipe beat the originals by more than the noise of these photos" if lo > 0 else
               "the originals beat the recipe by more than the noise of these photos" if hi < 0 else
               "the difference is within the noise of these photos")
    lines = [f"Hold-out test top-1 of stage 1's kept epoch, both runs with the same seed and {steps} optimiser "
             f"steps, on the same {n} photos:"]
    lines += [f"  {label:28s} {acc:5.1f} %  (95 % CI {lo_:.1f} to {hi_:.1f})" for label, acc, lo_, hi_ in rows]
    lines.append(f"  {'d - a, paired':28s} {diff:+5.1f} points  (95 % CI {lo:+.1f} to {hi:+.1f}): {verdict}")
    plots.bars_with_intervals([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                              [r[3] for r in rows], picture,
                              f"Hold-out test top-1 at equal optimiser steps ({n} photos, 95 % intervals)",
                              f"d - a = {diff:+.1f} points (95 % CI {lo:+.1f} to {hi:+.1f}), paired on the same photos")
    return lines, {"a": rows[0][1:], "d": rows[1][1:], "d_minus_a": [diff, lo, hi], "n": n}


def background_following(score_dir, data):
    """For each test photo on a background kind that belongs to another class in train (in file order):
    1 when the model named that other class, as a model that learnt the scene instead of the object does."""
    owner = dict(zip(make_demo_data.KINDS, make_demo_data.CLASSES))
    kinds = {r["file"]: r["kind"] for r in make_demo_data.read_record(data) if r["split"] == "test"}
    with open(Path(score_dir) / "predictions.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    scene = [(r, owner[kinds["test/" + r["file"]]]) for r in rows]
    return [int(r["predicted"] == cls) for r, cls in scene if cls != r["true"]]


def mask_quality(data, masks, out):
    """BR's masks against the demo's true masks: median IoU, share above 0.5, and a sheet of the worst."""
    import demo_truth
    from PIL import Image

    from smalldata import plots

    r = demo_truth.compare(masks, data / "masks" / "train", worst=6)
    if not r["compared"]:
        return [f"BR's masks: none in {masks} to compare with the truth (BR's images were written by an earlier run, "
                f"which skips them now; remove {data / 'br'} to measure the masks again)"], r
    rows = []
    for rel, iou in r["worst"]:
        stem = Path(rel).with_suffix("")
        photo = next((data / "train" / stem.parent).glob(stem.name + ".*"))
        br = data / "br" / rel
        cells = [(Image.open(photo), [f"{stem.name}", f"IoU {iou:.2f}"]),
                 (Image.open(data / "masks" / "train" / rel), ["true mask"]),
                 (Image.open(Path(masks) / rel), ["BR's mask"])]
        cells.append((Image.open(br), ["BR image"]) if br.exists() else (Image.new("RGB", (8, 8), "white"), ["(refused)"]))
        rows.append(cells)
    plots.image_grid(rows, out, cell=150, heading="BR's worst masks against the truth (demo photos, train)")
    return [f"BR's masks against the true masks ({r['compared']} training photos): median IoU "
            f"{r['median_iou']:.2f}, IoU above 0.5 for {100 * r['share_above_half']:.0f} %; the worst {len(rows)}: {out}"], r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data")
    p.add_argument("--out", default="checkpoints")
    p.add_argument("--small", action="store_true", help="the CPU configuration even on a GPU")
    p.add_argument("--seed", type=int, default=0, help="the seed of OCM and both stage-1 runs")
    p.add_argument("--epochs", type=int, nargs=2, metavar=("STAGE1", "STAGE2"),
                   help="shorten the configuration's epochs (bench/gpu_check.sh: a whole demo in minutes)")
    p.add_argument("--weights", choices=["auto", "none"], default="auto",
                   help="auto: ImageNet weights when they can be had; none: from scratch, nothing downloaded")
    args = p.parse_args()
    import torch

    from smalldata import files, intervals

    kind = "gpu" if torch.cuda.is_available() and not args.small else "cpu"
    cfg = CONFIGS[kind] if not args.epochs else {**CONFIGS[kind], "epochs1": args.epochs[0], "epochs2": args.epochs[1]}
    data, out = (REPO / args.data).resolve(), (REPO / args.out).resolve()
    logs = out / "demo_logs"
    logs.mkdir(parents=True, exist_ok=True)
    weights = "imagenet" if args.weights == "auto" and imagenet_weights_ready(cfg["arch"]) else "none"
    print(f"demo configuration ({kind}): {cfg['arch']} at {cfg['img_size']} px, weights {weights}"
          + ("; the recipe's model is vgg13_bn at 256 px: on a CPU the demo trains a smaller one" if kind == "cpu" else ""))
    timings = []
    n_train = count_images(data / "train")
    ocm = round(cfg["ocm_per_photo"] * n_train)
    common = ["--data", data, "--arch", cfg["arch"], "--img-size", cfg["img_size"], "--batch-size", cfg["batch_size"],
              "--weights", weights, "--seed", args.seed]
    run_step("background removal", [REPO / "make_remove_background.py", "--src", data / "train", "--dst", data / "br",
                                    "--model", "u2netp", "--fallback", "copy", "--bg-color", "auto",
                                    "--masks", out / "br_masks", "--preview", out / "br_preview.png"], logs, timings)
    run_step("one-class cutmix", [REPO / "make_cutmix.py", "--src", data / "train", "--dst", data / "ocm", "--count", ocm,
                                  "--img-size", cfg["img_size"], "--seed", args.seed,
                                  "--preview", out / "ocm_preview.png"], logs, timings)
    steps_d = (n_train + count_images(data / "br") + ocm) // cfg["batch_size"]
    steps_a = max(1, n_train // cfg["batch_size"])
    epochs_a = math.ceil(cfg["epochs1"] * steps_d / steps_a)  # the same optimiser steps as the recipe's run
    run_step(f"stage 1, recipe (d), {cfg['epochs1']} epochs", [REPO / "model_1e-4.py", *common, "--out", out,
                                                              "--epochs", cfg["epochs1"], "--watch", data / "test"],
             logs, timings)
    # (a) without --watch: only (d)'s curves show the test photos, and (a)'s 4x epochs cost less
    run_step(f"stage 1, originals (a), {epochs_a} epochs", [REPO / "model_1e-4.py", *common, "--out",
                                                           out / "originals-only", "--epochs", epochs_a,
                                                           "--no-br", "--no-ocm"], logs, timings)
    run_step("stage 2 (lr 1e-7), recipe", [REPO / "model_1e-7_ep20.py", "--data", data, "--out", out, "--init",
                                          out / "divergence.pth", "--epochs", cfg["epochs2"],
                                          "--batch-size", cfg["batch_size"]], logs, timings)
    # (check_score writes into <--out>/<scored folder>/: score/val and score/test side by side)
    for label, ckpt, folder, score in (("score (a), test", out / "originals-only" / "divergence.pth", data / "test",
                                        out / "originals-only" / "score"),
                                       ("score (d), test", out / "divergence.pth", data / "test", out / "score-stage1"),
                                       ("score final, val", out / "final.pth", data / "val", out / "score"),
                                       ("score final, test", out / "final.pth", data / "test", out / "score")):
        run_step(label, [REPO / "check_score.py", "--checkpoint", ckpt, "--data", folder, "--out", score], logs, timings)

    print("\n===== what the demo shows")
    masks_lines, masks = mask_quality(data, out / "br_masks", out / "br_worst_masks.png")
    print("\n".join(masks_lines))
    decision = json.loads((out / "stage1" / "divergence.json").read_text())
    print(f"Stage 1 of the recipe, {cfg['epochs1']} epochs, rule {decision['rule']['rule']}: {decision['reason']}; "
          f"curves: {out / 'stage1' / 'curves.png'}")
    print("  kept, each scored on val: " + "; ".join(
        f"{o['file']} {o['weights']} {o['val_acc']:.1f} % (95 % CI {o['val_ci95'][0]:.1f}-{o['val_ci95'][1]:.1f})"
        for o in decision["outputs"]))
    lines, numbers = comparison(out / "originals-only" / "score" / "test", out / "score-stage1" / "test",
                                out / "demo_comparison.png", cfg["epochs1"] * steps_d)
    lines.append(f"Test photos on a background that belongs to another class in train, named as that class "
                 f"(about {100 / len(make_demo_data.CLASSES):.0f} % by chance):")
    followed = {}
    for key, label, folder in (("a", "(a) originals only", out / "originals-only" / "score" / "test"),
                               ("d", "(d) the recipe", out / "score-stage1" / "test")):
        followed[key] = background_following(folder, data)
        k, n = sum(followed[key]), len(followed[key])
        numbers[f"followed_background_{key}"] = [k, n]
        lines.append(f"  {label:28s} {k} of {n} ({100 * k / max(n, 1):.0f} %)")
    diff, lo, hi = intervals.bootstrap([followed["d"]], [followed["a"]])
    numbers["followed_background_d_minus_a"] = [diff, lo, hi]
    lines.append(f"  {'d - a, paired':28s} {diff:+5.1f} points  (95 % CI {lo:+.1f} to {hi:+.1f})")
    print("\n".join(lines) + f"\npicture: {out / 'demo_comparison.png'}")
    files.write_json(out / "demo_summary.json", {"config": cfg, "kind": kind, "weights": weights, **numbers,
                                                 "masks": {k: masks.get(k) for k in ("compared", "median_iou",
                                                                                     "share_above_half")}})
    print("\n===== timings")
    for name, seconds, code in timings:
        print(f"{name:36s} {seconds:8.1f} s   exit {code}")
    print(f"{'total':36s} {sum(t for _, t, _ in timings):8.1f} s")
    print()
    for name, folder, where in (("Validation", out / "score" / "val", f"on {args.data}/val with {args.out}/final.pth"),
                                ("Hold-out test", out / "score" / "test",
                                 f"on {args.data}/test (never seen in training or model selection)")):
        s = json.loads((folder / "score.json").read_text())
        lo, hi = s["top1_ci95"]
        print(f"{name} Top-1 accuracy: {100 * s['top1']:.2f}% ({s['correct']}/{s['n']}, 95% CI "
              f"{100 * lo:.1f}-{100 * hi:.1f}%) {where}")
    print(f"\nlook at: {out}/br_preview.png and br_worst_masks.png (BR), {out}/ocm_preview.png (OCM), "
          f"{out}/stage1/curves.png (the stage-1 decision), {out}/demo_comparison.png")
    print(f"details: every step's output in {logs}/; each script's log.txt and skipped.csv in its output folder; "
          f"checkpoints {out}/divergence.pth, {out}/final.pth (python inspect_checkpoint.py PATH explains one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

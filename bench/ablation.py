"""Ablation of the recipe on real photos: what BR, OCM and the 1e-7 stage each add, measured by
running the five scripts themselves as subprocesses.

    python bench/ablation.py --photos ../shared/datasets/oxford17flowers --seeds 1     # CPU defaults
    python bench/ablation.py --photos ../shared/datasets/oxford17flowers --seeds 3     # on a GPU box

Per seed: split --photos (<class>/<image>) into <out>/work/seed<S>/data/{train,val,test} (symlinks,
--train/val/test-per-class photos of each of the first --classes classes), run
make_remove_background.py and make_cutmix.py once on data/train, then five configurations with the
same --epochs (the budget) and the stage-1 divergence rule at its defaults:
  a  originals only        model_1e-4.py --no-br --no-ocm
  b  + BR                  model_1e-4.py --no-ocm
  c  + OCM                 model_1e-4.py --no-br
  d  + BR + OCM            model_1e-4.py
  e  + BR + OCM + 1e-7     model_1e-7_ep20.py from d's divergence.pth (d's stage 1 is reused rather
                           than trained again: it is the same command with the same seed)
each scored by check_score.py on data/test (divergence.pth for a-d, final.pth for e).
Equal epochs is not equal steps: b-d see more images per epoch than a, as in the recipe itself.
Writes results.json, results.md (the table) and ablation.png (bar chart) to --out and prints the table.
Defaults are small on CPU (64 px, 5 classes, batch 16, 10 + 5 epochs) and the real ones on a GPU
(256 px, all classes, batch 32, up to 100 + 20 epochs). The work folder is rebuilt on every run.
"""
import argparse
import csv
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata.folders import list_files  # noqa: E402

CONFIGS = {  # name: (label, stage-1 flags, stage-1 run it belongs to, 1e-7 stage?)
    "a": ("originals", ["--no-br", "--no-ocm"], "a", False),
    "b": ("+ BR", ["--no-ocm"], "b", False),
    "c": ("+ OCM", ["--no-br"], "c", False),
    "d": ("+ BR + OCM", [], "d", False),
    "e": ("+ BR + OCM + 1e-7 stage", [], "d", True),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, and the docstring's layout kept."""


def get_args():
    import torch  # only to pick the defaults

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="real photos, <class>/<image>")
    p.add_argument("--out", type=Path, default=Path("/tmp/smalldata-bench/ablation"),
                   help="results here, the split and the runs under <out>/work (outside the repository)")
    p.add_argument("--seeds", type=int, default=1, help="repeat everything with this many seeds")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    p.add_argument("--classes", type=int, default=0 if gpu else 5, help="use the first N classes (0: all)")
    p.add_argument("--train-per-class", type=int, default=12, help="original training photos per class")
    p.add_argument("--val-per-class", type=int, default=10, help="validation photos per class")
    p.add_argument("--test-per-class", type=int, default=20, help="test photos per class")
    p.add_argument("--img-size", type=int, default=256 if gpu else 64, help="for OCM and stage 1")
    p.add_argument("--epochs", type=int, default=100 if gpu else 10,
                   help="stage-1 epochs, the same for every configuration (the divergence rule may stop earlier)")
    p.add_argument("--budget", choices=["epochs", "steps"], default="epochs",
                   help="epochs: every configuration trains --epochs epochs (the full mix then takes about 4x "
                        "the optimiser steps of originals only); steps: every configuration gets the steps "
                        "that originals only take in --epochs epochs, and its epochs follow")
    p.add_argument("--stage2-epochs", type=int, default=20 if gpu else 5, help="epochs of the 1e-7 stage (e)")
    p.add_argument("--batch-size", type=int, default=32 if gpu else 16)
    p.add_argument("--ocm-per-photo", type=float, default=2.5,
                   help="OCM images per original training photo (the original: 500 from about 200)")
    p.add_argument("--br-model", default="u2netp", help="rembg model for make_remove_background.py")
    p.add_argument("--weights", default="none",
                   help="stage-1 start, passed to model_1e-4.py: none (scratch) or imagenet (the published "
                        "recipe; needs the weights in $TORCH_HOME or a network)")
    p.add_argument("--configs", default="abcde", help="which configurations to run (e needs d)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the .pth files (several GB per run for VGG-13); by default they are deleted "
                        "once scored, keeping metrics, plots and scores")
    args = p.parse_args()
    if "e" in args.configs and "d" not in args.configs:
        p.error("configuration e continues d's stage 1: --configs must include d")
    if set(args.configs) - set(CONFIGS):
        p.error(f"--configs takes letters from {''.join(CONFIGS)}")
    args.hardware = describe_hardware(gpu)
    return args


def describe_hardware(gpu):
    import torch

    if gpu:
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores, no GPU"


# ---------------------------------------------------------------- data

def make_split(photos, dst, seed, args):
    """Symlink a seeded per-class split into dst/{train,val,test}; returns {split: count}."""
    classes = sorted(d.name for d in photos.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes[:args.classes] if args.classes else classes
    sizes = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
    for cls in classes:
        files = list_files(photos / cls)
        if len(files) < sum(sizes.values()):
            sys.exit(f"{photos / cls} has {len(files)} photos; the split needs {sum(sizes.values())}")
        random.Random(f"{seed}/{cls}").shuffle(files)  # per class: a class subset keeps the same photos
        start = 0
        for split, n in sizes.items():
            (dst / split / cls).mkdir(parents=True)
            for f in files[start:start + n]:
                (dst / split / cls / f.name).symlink_to(f.resolve())
            start += n
    return {split: n * len(classes) for split, n in sizes.items()}, classes


# ---------------------------------------------------------------- running the scripts

def run(script, flags, log):
    """Run one of the five scripts; returns (exit code, seconds). Exit 1 (some inputs skipped) is fine."""
    cmd = [sys.executable, str(REPO / script), *map(str, flags)]
    print(f"  $ {shlex.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    seconds = time.perf_counter() - t0
    print(f"    exit {code}, {seconds:.0f} s (log: {log})", flush=True)
    if code not in (0, 1):
        sys.exit(f"{script} failed; the end of its log:\n" + "".join(open(log).readlines()[-30:]))
    return code, seconds


def read_json(path):
    return json.loads(Path(path).read_text())


def stage_summary(stage_dir, kept=None):
    """Epochs trained, the kept epoch (default: the last, as stage 2 keeps it) and its val_acc, from metrics.csv."""
    rows = [{k: float(v) for k, v in r.items() if k in ("epoch", "val_acc", "gap")}
            for r in csv.DictReader(open(Path(stage_dir) / "metrics.csv"))]
    kept = rows[-1]["epoch"] if kept is None else kept
    return {"epochs_run": int(rows[-1]["epoch"]), "kept_epoch": int(kept),
            "val_acc_kept": next(r["val_acc"] for r in rows if r["epoch"] == kept),
            "val_acc_by_epoch": [r["val_acc"] for r in rows]}


def epochs_for(flags, counts, prep, args):
    """Stage-1 epochs of a configuration: --epochs, or with --budget steps the epochs that give it the
    optimiser steps originals only take in --epochs epochs."""
    if args.budget == "epochs":
        return args.epochs
    images = counts["train"] + prep["br_images"] * ("--no-br" not in flags) + prep["ocm_images"] * ("--no-ocm" not in flags)
    return max(1, round(args.epochs * counts["train"] / images))


def drop_checkpoints(folder):
    for p in Path(folder).rglob("*.pth"):
        p.unlink()


def run_seed(seed, args):
    """Split, BR, OCM and every configuration for one seed; returns the seed's settings and results."""
    work = args.out / "work" / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    data, logs = work / "data", work / "logs"
    logs.mkdir(parents=True)
    counts, classes = make_split(args.photos, data, seed, args)
    print(f"seed {seed}: {len(classes)} classes, {counts} photos in {data}", flush=True)
    prep = {}
    _, prep["br_s"] = run("make_remove_background.py", ["--src", data / "train", "--dst", data / "br",
                                                         "--model", args.br_model], logs / "br.log")
    ocm_count = round(args.ocm_per_photo * counts["train"])
    _, prep["ocm_s"] = run("make_cutmix.py", ["--src", data / "train", "--dst", data / "ocm", "--count", ocm_count,
                                              "--img-size", args.img_size, "--seed", seed], logs / "ocm.log")
    prep["br_images"] = len(list_files(data / "br"))
    prep["ocm_images"] = ocm_count
    common = ["--data", data, "--batch-size", args.batch_size, "--seed", seed]
    stage1, results = {}, []
    for name in [c for c in CONFIGS if c in args.configs]:  # d before e
        label, flags, s1_name, second = CONFIGS[name]
        out = work / s1_name
        if s1_name not in stage1:  # e reuses d's stage 1
            print(f"[seed {seed}] {name}: {label}", flush=True)
            _, s = run("model_1e-4.py", [*common, "--out", out, "--epochs", epochs_for(flags, counts, prep, args),
                                         "--img-size", args.img_size,
                                         "--weights", args.weights, *flags], logs / f"{s1_name}_1e-4.log")
            if not args.keep_checkpoints:  # scoring needs only divergence.pth: free the GBs of epochs/, last.pth
                drop_checkpoints(out / "1e-4")
            div = read_json(out / "1e-4" / "divergence.json")
            stage1[s1_name] = {"seconds": s, **stage_summary(out / "1e-4", div["chosen_epoch"]),
                               "rule_fired": bool(div["fired"])}
        else:
            print(f"[seed {seed}] {name}: {label} (stage 1 of {s1_name} reused)", flush=True)
        train_s, ckpt, stage2 = stage1[s1_name]["seconds"], out / "divergence.pth", None
        if second:
            _, s = run("model_1e-7_ep20.py", [*common, "--out", out, "--init", out / "divergence.pth",
                                              "--epochs", args.stage2_epochs, *flags], logs / f"{name}_1e-7.log")
            train_s += s
            ckpt = out / "final.pth"
            stage2 = {"seconds": s, **stage_summary(out / "1e-7")}
        score_dir = out / f"score_{name}"
        _, score_s = run("check_score.py", ["--checkpoint", ckpt, "--data", data / "test", "--out", score_dir],
                         logs / f"{name}_score.log")
        score = read_json(score_dir / "score.json")
        results.append({"seed": seed, "config": name, "label": label, "top1": 100 * score["top1"], "n_test": score["n"],
                        "train_seconds": train_s, "score_seconds": score_s, "stage1": stage1[s1_name],
                        "stage2": stage2, "stage1_reused_from": s1_name if s1_name != name else None})
        print(f"    -> test top-1 {results[-1]['top1']:.2f} %", flush=True)
    if not args.keep_checkpoints:
        drop_checkpoints(work)
    return {"seed": seed, "classes": classes, "counts": counts, "prep": prep, "runs": results}


# ---------------------------------------------------------------- reporting

def kept(run):
    """The scored checkpoint's stage summary: stage 2's for e, stage 1's otherwise."""
    return run["stage2"] or run["stage1"]


def aggregate(seeds, configs):
    rows = []
    for name in configs:
        runs = [r for s in seeds for r in s["runs"] if r["config"] == name]
        top1 = [r["top1"] for r in runs]
        rows.append({"config": name, "label": runs[0]["label"], "top1": top1, "mean": statistics.mean(top1),
                     "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "val": [kept(r)["val_acc_kept"] for r in runs],
                     "epochs": [f"{kept(r)['kept_epoch']} / {kept(r)['epochs_run']}" for r in runs],
                     "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
                     "score_seconds": statistics.mean(r["score_seconds"] for r in runs)})
    return rows


def markdown(rows, seeds):
    n = len(seeds)
    head = "test top-1 %" + (f" (mean ± std of {n} seeds; per seed)" if n > 1 else "")
    lines = [f"| run | training data | {head} | val % of the kept epoch | epoch kept / epochs run | train s | score s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        top = f"{r['mean']:.1f}" + (f" ± {r['std']:.1f} ({', '.join(f'{t:.1f}' for t in r['top1'])})" if n > 1 else "")
        lines.append(f"| {r['config']} | {r['label']} | {top} | {', '.join(f'{v:.1f}' for v in r['val'])} | "
                     f"{', '.join(r['epochs'])} | {r['train_seconds']:.0f} | {r['score_seconds']:.0f} |")
    first = seeds[0]
    lines += ["", f"Chance: {100 / len(first['classes']):.1f} %. Test: {first['counts']['test']} photos, "
              f"val: {first['counts']['val']}, train: {first['counts']['train']} originals per seed. "
              f"Once per seed: BR {statistics.mean(s['prep']['br_s'] for s in seeds):.0f} s "
              f"({', '.join(str(s['prep']['br_images']) for s in seeds)} BR images written), "
              f"OCM {statistics.mean(s['prep']['ocm_s'] for s in seeds):.0f} s ({first['prep']['ocm_images']} images). "
              "Epochs of e are its 1e-7 stage's (epoch 0 = d's checkpoint). Train s: wall seconds of "
              "model_1e-4.py, plus model_1e-7_ep20.py for e (whose stage 1 is d's, counted in both rows); "
              "means over seeds."]
    return "\n".join(lines)


def bar_chart(rows, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    ax.bar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows] if len(seeds) > 1 else None,
           color="#4c72b0", capsize=4)
    for x, r in zip(xs, rows):  # every seed's score as a dot, so the spread is visible
        ax.scatter([x] * len(r["top1"]), r["top1"], color="black", s=12, zorder=3)
        ax.text(x, 2, f"{r['mean']:.1f}", ha="center", va="bottom", fontsize=9, color="white")  # clear of the dots
    ax.axhline(100 / len(seeds[0]["classes"]), color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks(list(xs), [f"{r['config']}\n{r['label'].replace(' + 1e-7 stage', ' +1e-7')}" for r in rows],
                  fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Recipe ablation, {len(seeds)} seed(s)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = get_args()
    if not args.photos.is_dir():
        sys.exit(f"--photos {args.photos}: folder not found")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"settings: {json.dumps(settings)}", flush=True)
    t0 = time.perf_counter()
    seeds = [run_seed(args.first_seed + i, args) for i in range(args.seeds)]
    rows = aggregate(seeds, [c for c in CONFIGS if c in args.configs])
    table = markdown(rows, seeds)
    settings["total_seconds"] = round(time.perf_counter() - t0)
    settings["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    (args.out / "results.json").write_text(json.dumps({"settings": settings, "summary": rows, "seeds": seeds},
                                                      indent=1, default=str))
    (args.out / "results.md").write_text(table + "\n")
    bar_chart(rows, seeds, args.out / "ablation.png")
    print("\n" + table)
    print(f"\n{settings['total_seconds']} s in all; results: {args.out}/results.md, results.json, ablation.png")


if __name__ == "__main__":
    main()

"""What each part of the recipe buys on your photos, at equal cost: one command, intervals on everything.

    python bench/ablation.py --photos PHOTOS --seeds 3               # PHOTOS: <class>/<image> folders
    python bench/ablation.py --photos PHOTOS --cells tune:0 tune:1 report:2 report:3 report:4   # our evidence
    python bench/ablation.py --report --out DIR                      # tables again from what DIR holds
    python bench/ablation.py --report --out bench/histories/vgg13_bn-64                     # our histories

Per cell (a seed, and the classes it draws): split PHOTOS into train / val / test (symlinks), run
make_remove_background.py and make_cutmix.py on train, then train every configuration with
model_1e-4.py for its whole budget (--rule last, or with --candidates the divergence rule with
--no-early-stop: no rule stops it) with --watch on the test split, so that every
epoch's test accuracy, photo by photo, is in the run's watch.csv. Which epoch a configuration keeps
is then replayed from its history with the project's default choice (smalldata.rule), never read from
the test split. Configurations:
  a        the originals only                     d        originals + BR + OCM (the recipe)
  b        originals + BR                         c        originals + OCM
  d-light  the recipe with --augment light        d-none   the recipe with --augment none
  plain    a plain torchvision loop on the originals (bench/plain_loop.py: ImageFolder, no
           augmentation, BatchNorm's running averages, best-val epoch)
  e        d's divergence.pth, then model_1e-7_ep20.py (the 1e-7 stage: the recipe's path)
  e-swa    d's swa.pth, then model_1e-7_ep20.py (needs d run with --candidates)
Budget: d trains --epochs epochs; every other configuration gets the optimiser steps that d takes
(equal steps, the headline), so a, with a quarter of the images, trains about four times the epochs;
a's history up to --epochs epochs is its equal-epochs run (no schedule, no stop: the same run, cut).
Test accuracy of each configuration: mean over cells with a 95 % t interval over cells, and each cell's
value; each against the recipe (d) as a paired difference on the same test photos.
Histories go to <out>/histories/<cell>_<config>.csv (+ .watch.csv), a run already there is not
trained again; the split, the runs and their logs to <out>/work. Defaults depend on the hardware:
on a CPU vgg13_bn at 64 px, 5 classes, batch 16, 20 epochs; on a GPU 256 px, all classes, batch 32,
100 epochs. bench/stopping.py replays the same histories to compare the ways of keeping an epoch.
"""
import argparse
import csv
import json
import math
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata import intervals  # noqa: E402
from smalldata.folders import find_classes, list_files  # noqa: E402

CONFIGS = {  # name: (label, model_1e-4.py flags)
    "a": ("originals only", ["--no-br", "--no-ocm"]),
    "b": ("originals + BR", ["--no-ocm"]),
    "c": ("originals + OCM", ["--no-br"]),
    "d": ("originals + BR + OCM (the recipe)", []),
    "d-light": ("the recipe, --augment light", ["--augment", "light"]),
    "d-none": ("the recipe, --augment none", ["--augment", "none"]),
    "plain": ("plain torchvision loop, originals", None),
    "e": ("the recipe + the 1e-7 stage (from d's divergence.pth)", None),
    "e-swa": ("the recipe + the 1e-7 stage from d's swa.pth", None),
}
STAGE2_FROM = {"e": "divergence.pth", "e-swa": "swa.pth"}  # the 1e-7 stage: the file of d it starts from
PART_SEED = 20261129  # splits the classes into a tuning part and a reporting part, once for all cells


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, and the docstring's layout kept."""


def get_args():
    import torch  # only to pick the defaults

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--photos", type=Path, help="real photos, <class>/<image>")
    p.add_argument("--out", type=Path, default=Path("/tmp/smalldata-bench/ablation"),
                   help="histories, results and the work folder (outside the repository)")
    p.add_argument("--seeds", type=int, default=1, help="cells all:0 .. all:N-1 (classes from all of PHOTOS)")
    p.add_argument("--cells", nargs="+", default=None, metavar="PART:SEED",
                   help="cells to run: all:S draws from every class; tune:S and report:S from two disjoint "
                        "halves of the classes (tune on one, report on the other)")
    p.add_argument("--configs", nargs="+", default=["d", "a"], choices=list(CONFIGS),
                   help="configurations, run in this order within each pass over the cells")
    p.add_argument("--classes", type=int, default=0 if gpu else 5, help="classes per cell (0: all of its part)")
    p.add_argument("--train-per-class", type=int, default=12)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--arch", default="vgg13_bn")
    p.add_argument("--img-size", type=int, default=256 if gpu else 64)
    p.add_argument("--epochs", type=int, default=100 if gpu else 20, help="the recipe's (d's) epochs")
    p.add_argument("--stage2-epochs", type=int, default=20, help="epochs of the 1e-7 stage (e)")
    p.add_argument("--batch-size", type=int, default=32 if gpu else 16)
    p.add_argument("--ocm-per-photo", type=float, default=2.0, help="OCM images per original training photo")
    p.add_argument("--weights", default="none", help="none (scratch) or imagenet, for model_1e-4.py")
    p.add_argument("--candidates", action="store_true",
                   help="d runs the divergence rule without stopping (--no-early-stop) and scores its weight averages "
                        "(swa, ema) every epoch too (--candidates-each-epoch), keeping divergence.pth, swa.pth and "
                        "ema.pth for e and e-swa; without it d runs --rule last and no averages are kept (neither "
                        "changes the training)")
    p.add_argument("--report", action="store_true", help="only print the tables from <out>/histories")
    args = p.parse_args()
    args.cells = args.cells or [f"all:{s}" for s in range(args.seeds)]
    if not args.report and (args.photos is None or not args.photos.is_dir()):
        p.error("--photos: a folder of <class>/<image> is needed (or --report)")
    return args


# ---------------------------------------------------------------- the cells

def part_classes(photos, part):
    classes = find_classes(photos)
    if part == "all":
        return classes
    shuffled = sorted(classes)
    random.Random(PART_SEED).shuffle(shuffled)
    half = len(shuffled) // 2
    return sorted(shuffled[:half] if part == "tune" else shuffled[half:])


def make_cell(args, cell, data):
    """data/{train,val,test}/<class>/ of symlinks: the cell's classes and photos, drawn by its seed."""
    part, seed = cell.split(":")
    rng = random.Random(f"{cell}")
    pool = part_classes(args.photos, part)
    classes = sorted(rng.sample(pool, args.classes) if args.classes and args.classes < len(pool) else pool)
    sizes = {"train": args.train_per_class, "val": args.val_per_class, "test": args.test_per_class}
    for cls in classes:
        photos = list_files(args.photos / cls)
        if len(photos) < sum(sizes.values()):
            sys.exit(f"{args.photos / cls} has {len(photos)} photos; a cell needs {sum(sizes.values())}")
        rng.shuffle(photos)
        start = 0
        for split, n in sizes.items():
            (data / split / cls).mkdir(parents=True, exist_ok=True)
            for photo in photos[start:start + n]:
                (data / split / cls / photo.name).symlink_to(photo.resolve())
            start += n
    return classes


class RunFailed(Exception):
    """A step that exited with a code other than 0 or 1: its run is lost, the other runs go on."""


def run(cmd, log):
    """Run a command; returns seconds. Exit 1 (some inputs skipped) is fine; any other code fails this run
    (RunFailed), and the bench goes on with the others and names it at the end."""
    print(f"  $ {shlex.join(map(str, cmd))}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code not in (0, 1):
        raise RunFailed(f"{Path(cmd[0]).name} failed ({code}); the end of {log}:\n"
                        + "".join(open(log).readlines()[-30:]))
    return time.perf_counter() - t0


def prepare(args, cell, work):
    """The cell's split, BR and OCM images (once); returns the data folder and its image counts."""
    data = work / "data"
    if not (data / "ocm" / "manifest.csv").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make_cell(args, cell, data)
        seed = cell.split(":")[1]
        run([REPO / "make_remove_background.py", "--src", data / "train", "--dst", data / "br", "--model", "u2netp"],
            work / "prepare.log")
        n_train = len(list_files(data / "train"))
        run([REPO / "make_cutmix.py", "--src", data / "train", "--dst", data / "ocm", "--img-size", args.img_size,
             "--count", round(args.ocm_per_photo * n_train), "--seed", seed], work / "prepare.log")
    counts = {s: len([p for p in list_files(data / s) if p.suffix != ".csv" and p.suffix != ".json"])
              for s in ("train", "br", "ocm", "val", "test")}
    return data, counts


def steps_per_epoch(flags, counts, batch):
    images = counts["train"] + counts["br"] * ("--no-br" not in flags) + counts["ocm"] * ("--no-ocm" not in flags)
    return max(1, images // batch)


def train_config(args, cell, name, data, counts, work, histories):
    label, flags = CONFIGS[name]
    target = histories / f"{cell.replace(':', '-')}_{name}.csv"
    if target.exists():
        return
    seed = cell.split(":")[1]
    steps = args.epochs * steps_per_epoch([], counts, args.batch_size)  # the recipe's budget
    common = ["--data", data, "--batch-size", args.batch_size, "--seed", seed, "--no-cache", "--watch", data / "test"]
    out = work / name
    t0 = time.perf_counter()
    print(f"[{cell}] {name}: {label}", flush=True)
    if name == "plain":
        run([REPO / "bench" / "plain_loop.py", "--data", data, "--out", out / "history.csv", "--arch", args.arch,
             "--img-size", args.img_size, "--batch-size", args.batch_size, "--steps", steps, "--seed", seed],
            work / f"{name}.log")
        shutil.copyfile(out / "history.csv", target)
        return
    if name in STAGE2_FROM:
        start = work / "d" / STAGE2_FROM[name]
        if not start.is_file():
            print(f"  (skipped: {start} is needed first)", flush=True)
            return
        run([REPO / "model_1e-7_ep20.py", *common, "--out", out, "--init", start, "--epochs", args.stage2_epochs],
            work / f"{name}.log")
        stage = out / "stage2"
    else:
        epochs = math.ceil(steps / steps_per_epoch(flags, counts, args.batch_size))
        if name == "d" and args.candidates:
            extra = ["--rule", "divergence", "--no-early-stop", "--candidates-each-epoch"]
        else:
            extra = ["--rule", "last", "--swa-epochs", 0, "--ema-epochs", 0]
        run([REPO / "model_1e-4.py", *common, "--out", out, "--arch", args.arch, "--weights", args.weights,
             "--img-size", args.img_size, "--epochs", epochs, *flags, *extra], work / f"{name}.log")
        stage = out / "stage1"
    shutil.copyfile(stage / "metrics.csv", target)
    for part in ("watch", "val_losses", "train_losses"):  # per photo: test correctness, val and train losses
        if (stage / f"{part}.csv").is_file():
            shutil.copyfile(stage / f"{part}.csv", target.with_suffix(f".{part}.csv"))
    if name != "d":  # GBs; d's divergence.pth and swa.pth wait for e and e-swa
        for p in out.rglob("*.pth"):
            p.unlink()
    print(f"    {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- the report

def read_history(path):
    """The metric rows of a recorded run (a history <cell>_<config>.csv, or a stage's metrics.csv), with what
    was recorded beside it: which test photos each epoch got right (watch) and each photo's val and train
    loss (<history>.val_losses.csv, or val_losses.csv beside a metrics.csv)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = [{k: (v if k.endswith("_correct") else float(v)) for k, v in r.items() if v != ""}
                for r in csv.DictReader(f)]
    for r in rows:
        r["epoch"] = int(r["epoch"])
    by_epoch = {r["epoch"]: r for r in rows}
    for part in ("watch", "val_losses", "train_losses"):
        beside = path.with_name(f"{part}.csv") if path.name == "metrics.csv" else path.with_suffix(f".{part}.csv")
        if not beside.exists():
            continue
        with open(beside, newline="") as f:
            table = list(csv.reader(f))
        for line in table[1:]:
            row = by_epoch.get(int(line[0]))
            if row is None:
                continue
            if part == "watch":
                row.update({k: v for k, v in zip(table[0][1:], line[1:]) if v})
            else:  # epoch, correct, one loss per photo
                split = part.split("_")[0]
                row[f"{split}_correct"], row[f"{split}_losses"] = line[1], [float(v) for v in line[2:]]
    return rows


def accuracy(bits):
    return 100 * bits.count("1") / len(bits)


def kept_bits(name, rows, budget_epochs=None):
    """The test correctness of the epoch a configuration keeps: the project's default choice replayed
    on its history (cut at `budget_epochs`), the best-val epoch for the plain loop, the last for e and e-swa."""
    from smalldata import rule as rules

    rows = [r for r in rows if budget_epochs is None or r["epoch"] <= budget_epochs]
    if name == "plain":
        return max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))["watch_correct"]
    if name in STAGE2_FROM:
        return rows[-1]["watch_correct"]
    decision = rules.default_rule().observe([r for r in rows if r["epoch"] > 0])
    return next(r for r in rows if r["epoch"] == decision.chosen)["watch_correct"]


def report(args):
    histories = args.out / "histories" if (args.out / "histories").is_dir() else args.out  # (or a folder of them)
    recorded = args.out / "settings.json"  # the budget the histories were recorded with
    if recorded.is_file():
        settings = json.loads(recorded.read_text())
        args.epochs, args.stage2_epochs = settings.get("epochs", args.epochs), settings.get("stage2_epochs", 20)
    runs = {}
    for path in sorted(histories.glob("*.csv")):
        if path.name.endswith((".watch.csv", "_losses.csv")):
            continue
        cell, name = path.stem.rsplit("_", 1)
        runs.setdefault(name, {})[cell] = read_history(path)
    if "d" not in runs:
        sys.exit(f"no recorded runs of the recipe (d) in {histories}")
    cells = sorted(runs["d"])
    lines = [f"Test top-1 of the kept epoch, mean over {len(cells)} cell(s) ({', '.join(cells)}) with a 95 % t interval "
             "over cells and each cell's value; difference to the recipe (d) paired on the same test photos.",
             "", "| configuration | budget | test top-1 % | minus the recipe (d), points |", "|---|---|---|---|"]
    d_acc = {c: accuracy(kept_bits("d", runs["d"][c])) for c in cells}
    for name in CONFIGS:
        if name not in runs:
            continue
        both = [c for c in cells if c in runs[name]]
        budgets = [("equal steps", None)] + ([(f"equal epochs ({args.epochs})", args.epochs)] if name == "a" else [])
        for budget, cut in budgets:
            mine = [accuracy(kept_bits(name, runs[name][c], cut)) for c in both]
            if name == "d":
                diff = "-"
            elif name in STAGE2_FROM:  # (started from the d checkpoint of its recording, which today's rule may
                diff = "its own start: below"  # no longer keep: it is compared with its own start, below)
            else:
                diff = intervals.describe_runs([m - d_acc[c] for m, c in zip(mine, both)], signed=True)
            lines.append(f"| {name}: {CONFIGS[name][0]} | {budget if name not in STAGE2_FROM else f'd + {args.stage2_epochs} epochs'}"
                         f"{'' if len(both) == len(cells) else f' ({len(both)} cells)'} | "
                         f"{intervals.describe_runs(mine)} | {diff} |")
    for name, start_name in STAGE2_FROM.items():  # each against its own start
        if name not in runs:
            continue
        cells_e = sorted(runs[name])
        start = [next(r for r in runs[name][c] if r["epoch"] == 0) for c in cells_e]
        end = [runs[name][c][-1] for c in cells_e]
        diff = intervals.describe_runs([accuracy(e["watch_correct"]) - accuracy(s["watch_correct"])
                                        for s, e in zip(start, end)], signed=True)
        val = [e["val_acc"] - s["val_acc"] for s, e in zip(start, end)]
        lines += ["", f"The 1e-7 stage from d's {start_name} ({end[0]['epoch']} epochs, {len(cells_e)} cell(s)): test "
                      f"top-1 after it minus before it, paired: {diff} points; val_acc change per cell: "
                      + ", ".join(f"{v:+.1f}" for v in val) + " points"]
    both = sorted(set(runs.get("e", {})) & set(runs.get("e-swa", {})))
    if both:  # the recipe's path against the alternative, on the same test photos
        diff = intervals.describe_runs([accuracy(kept_bits("e-swa", runs["e-swa"][c]))
                                        - accuracy(kept_bits("e", runs["e"][c])) for c in both], signed=True)
        lines += ["", f"Stage 2 from swa.pth minus stage 2 from divergence.pth (the recipe's path), test top-1, "
                      f"{len(both)} cell(s): {diff} points"]
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    print(f"\nwritten: {args.out / 'results.md'}")


def main():
    args = get_args()
    if not args.report:
        histories = args.out / "histories"
        histories.mkdir(parents=True, exist_ok=True)
        (args.out / "settings.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()}, indent=1))
        prepared, failed = {}, []
        for name in args.configs:  # one pass per configuration, over every cell: early results cover all cells
            for cell in args.cells:
                work = args.out / "work" / cell.replace(":", "-")
                try:
                    if cell not in prepared:
                        prepared[cell] = None  # (a cell whose preparation failed is not tried again)
                        prepared[cell] = prepare(args, cell, work)
                    if prepared[cell] is not None:
                        train_config(args, cell, name, *prepared[cell], work, histories)
                except RunFailed as e:
                    print(f"[{cell}] {name}: {e}", file=sys.stderr, flush=True)
                    failed.append(f"{cell} {name}")
        if failed:
            print(f"failed, left out of the tables below: {', '.join(failed)} (logs in {args.out / 'work'})",
                  file=sys.stderr, flush=True)
    report(args)
    if not args.report and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

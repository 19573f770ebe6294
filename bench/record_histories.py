"""Record stage-1 metric histories on real photos, for bench/stopping.py and the tests.

    python bench/record_histories.py --photos PHOTOS            # PHOTOS: <class>/<image> folders

For each class count and seed it draws a split of PHOTOS (classes and photos chosen by the seed:
--train/--val/--test photos per class), makes the BR and OCM images of the full mix, and trains
stage 1 for every epoch (--no-early-stop) with --watch on the test split, once on the originals
only and once on the full mix. Each run's metrics.csv is copied to
bench/histories/c<classes>_s<seed>_<mix>.csv; a history that is already there is not recorded again.
Mix "orig-nobn" is the originals run without BatchNorm recalibration, to measure what it steadies.
"""
import argparse
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HISTORIES = REPO / "bench" / "histories"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="<class>/<image> folders of real photos")
    p.add_argument("--classes", type=int, nargs="+", default=[5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mixes", nargs="+", default=["orig", "full", "orig-nobn"],
                   choices=["orig", "full", "orig-nobn"])
    p.add_argument("--train", type=int, default=10, help="training photos per class")
    p.add_argument("--val", type=int, default=10, help="validation photos per class")
    p.add_argument("--test", type=int, default=20, help="watched hold-out photos per class")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/smalldata-histories"))
    return p.parse_args()


def make_split(args, n_classes, seed, root):
    """root/{train,val,test}/<class>/ of symbolic links to the chosen photos."""
    rng = random.Random(seed)
    classes = sorted(rng.sample(sorted(d.name for d in args.photos.iterdir() if d.is_dir()), n_classes))
    for cls in classes:
        photos = sorted(p for p in (args.photos / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        rng.shuffle(photos)
        start = 0
        for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for photo in photos[start:start + n]:
                (root / split / cls / photo.name).symlink_to(photo.resolve())
            start += n


def run(cmd, log):
    with open(log, "a") as f:
        code = subprocess.call([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code not in (0, 1):
        sys.exit(f"failed ({code}): {' '.join(map(str, cmd))}; see {log}")


def record(args, n_classes, seed, mix):
    target = HISTORIES / f"c{n_classes}_s{seed}_{mix}.csv"
    if target.exists():
        return
    root = args.work / f"c{n_classes}_s{seed}"
    data, log = root / "data", root / "log.txt"
    if not (data / "test").is_dir():
        shutil.rmtree(root, ignore_errors=True)
        make_split(args, n_classes, seed, data)
    flags = ["--data", data, "--out", root / f"ck-{mix}", "--arch", args.arch, "--weights", "none",
             "--img-size", args.img_size, "--epochs", args.epochs, "--batch-size", args.batch_size,
             "--seed", seed, "--watch", data / "test", "--no-early-stop", "--fresh", "--device", "cpu"]
    if mix == "full":
        run([REPO / "make_remove_background.py", "--src", data / "train", "--dst", data / "br",
             "--model", "u2netp", "--fallback", "copy"], log)
        run([REPO / "make_cutmix.py", "--src", data / "train", "--dst", data / "ocm", "--img-size",
             args.img_size, "--count", 2 * args.train * n_classes, "--seed", seed], log)
    else:
        flags += ["--no-br", "--no-ocm"] + (["--no-precise-bn"] if mix == "orig-nobn" else [])
    t0 = time.time()
    run([REPO / "model_1e-4.py", *flags], log)
    HISTORIES.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / f"ck-{mix}" / "1e-4" / "metrics.csv", target)
    shutil.rmtree(root / f"ck-{mix}")  # the checkpoints are not needed, only the history
    print(f"{target.name}: {time.time() - t0:.0f} s", flush=True)


def main():
    args = get_args()
    for seed in args.seeds:  # every configuration of seed 0 first: partial results already cover all
        for n_classes in args.classes:
            for mix in args.mixes:
                record(args, n_classes, seed, mix)


if __name__ == "__main__":
    main()

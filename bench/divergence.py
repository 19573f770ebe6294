"""Does the divergence rule see a real widening, and only that? Its false-fire rate and its power,
simulated from real per-photo losses.

    python bench/divergence.py                                      # the committed histories, 500 + 500 runs
    python bench/divergence.py --histories DIR --part report --runs 1000
    python bench/divergence.py --histories DIR1 DIR2 --runs 300             # the runs of both folders pooled

Every simulated history is made of real noise: the per-photo val and train losses that recorded runs
wrote every epoch (val_losses.csv, train_losses.csv; bench/ablation.py copies the recipe's stage 1's
as <cell>_d.val_losses.csv). From each real run, past its first --skip epochs, each photo's loss is
split into a smooth part (a centred moving mean over --smooth epochs) and its epoch-to-epoch residual;
an epoch's residuals, one per photo, are kept together (what the whole model does that epoch stays
what it was), and runs of --block consecutive epochs are drawn together (the noise's memory over a few
epochs stays too). A simulated history is the run's photos at the level of its lowest-loss epoch plus
such residuals, epoch after epoch:
  null        a plateau: nothing else (the rule must not fire: a false fire)
  divergence  from a random onset, each photo's val loss rises, in proportion to its level (the wrong
              and unsure photos rise, the sure ones barely), the mean by --rise per epoch (the rule must
              fire within 10 epochs of the onset and keep an epoch within 3 of it)
Each rate is printed with its 95 % Wilson interval; the last line reads
`false-fire F % (95 % CI a-b), power P % (95 % CI c-d)`.
"""
import argparse
import csv
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata import intervals, rule as rules  # noqa: E402

HISTORIES = REPO / "bench" / "histories" / "vgg13_bn-64-div"


def per_photo(path):
    """(epochs, photos) array of a per-photo loss file (epoch, correct, one loss per photo)."""
    with open(path, newline="") as f:
        return np.array([[float(v) for v in line[2:]] for line in list(csv.reader(f))[1:]])


def noise_source(val, train, skip=10, smooth=7):
    """What a real run lends the simulation: per split, each photo's level at the run's lowest-val-loss
    epoch and the residual of every epoch past `skip` (scaled back up for what the moving mean takes:
    for independent noise it leaves (1 - 1/smooth) of the variance)."""
    half = smooth // 2

    def split(losses):
        kernel = np.ones(smooth) / smooth
        trend = np.stack([np.convolve(losses[:, i], kernel, mode="valid") for i in range(losses.shape[1])], 1)
        residual = (losses[half:len(losses) - half] - trend) / np.sqrt(1 - 1 / smooth)
        return trend, residual[skip:]

    val_trend, val_residual = split(val)
    train_trend, train_residual = split(train)
    lowest = int(val_trend[skip:].mean(1).argmin()) + skip
    return {"val": (val_trend[lowest], val_residual), "train": (train_trend[lowest], train_residual)}


def history(source, epochs, rng, onset=None, rise=0.05, block=3):
    """Metric rows of a simulated run: the source run's levels plus its residuals drawn in blocks of
    consecutive epochs; from `onset` on, each val photo rises by rise x (its level / the mean level) per
    epoch."""
    n_res = len(source["val"][1])
    picks = []
    while len(picks) < epochs:
        start = rng.randrange(max(1, n_res - block + 1))
        picks += list(range(start, min(start + block, n_res)))
    rows = []
    for t, pick in enumerate(picks[:epochs], 1):
        row = {"epoch": t}
        for split, (level, residual) in source.items():
            losses = level + residual[pick]
            if split == "val" and onset is not None and t > onset:
                losses = losses + rise * (t - onset) * level / level.mean()
            losses = np.maximum(losses, 0.0)
            row[f"{split}_losses"], row[f"{split}_loss"] = losses.tolist(), float(losses.mean())
            # (no predictions here: a photo counts as right when its class has over half the probability)
            row[f"{split}_acc"], row[f"{split}_n"] = 100 * float((losses < np.log(2)).mean()), len(losses)
        rows.append(row)
    return rows


def where_it_rose(val, skip=10, smooth=7):
    """What a real run's val loss did after its lowest point: the epoch of the lowest moving mean (past
    `skip`), the mean loss there and over the last 10 epochs, and the share of that change carried by
    photos whose loss was over 0.5 at the lowest (the wrong or unsure ones)."""
    trend = np.convolve(val.mean(1), np.ones(smooth) / smooth, mode="valid")
    low = int(trend[skip:].argmin()) + skip
    before, after = val[low:low + smooth].mean(0), val[-10:].mean(0)
    change = after - before
    share = change[before > 0.5].sum() / change.sum() if change.sum() > 0 else float("nan")
    return low + smooth // 2 + 1, before.mean(), after.mean(), share


def shared_share(residual):
    """The share of the photos' residual variance along its first principal component: how much of the
    noise is one pattern the photos move in together (with loadings of either sign)."""
    singular = np.linalg.svd(residual - residual.mean(0), compute_uv=False)
    return float(singular[0] ** 2 / (singular ** 2).sum())


def run_files(folders, part):
    """{run name: its val_losses.csv} of the recipe's stage-1 runs (d, not stage 2's e) in `folders`."""
    return {p.name.split(".")[0]: p for folder in folders for p in sorted(Path(folder).glob("*_d.val_losses.csv"))
            if part == "all" or p.name.startswith(part)}


def sources(folders, part, skip=10, smooth=7):
    """Each run's noise source (noise_source), by run name, from one folder or several."""
    files = run_files([folders] if isinstance(folders, (str, Path)) else folders, part)
    return {name: noise_source(per_photo(p), per_photo(p.with_name(p.name.replace("val_", "train_"))), skip, smooth)
            for name, p in files.items()}


def simulate(srcs, runs, epochs, rise, rule, seed=0, block=3, per_source=None):
    """(false fires, onsets found in time and kept near, runs) over `runs` null and `runs` divergent histories,
    the noise sources taken in turn; `per_source`, a dict, gets the same three counts for each source."""
    rng = random.Random(seed)
    names = sorted(srcs)
    tally = {name: [0, 0, 0] for name in names}
    for i in range(runs):
        name = names[i % len(names)]
        null = rule.observe(history(srcs[name], epochs, rng, block=block))
        onset = rng.randint(rule.min_epochs + 5, rule.min_epochs + 25)
        d = rule.observe(history(srcs[name], epochs, rng, onset=onset, rise=rise, block=block))
        found = d.evidence["fired"] and d.evidence["fired_at"] - onset <= 10 and abs(d.chosen - onset) <= 3
        counts = tally[name]
        counts[0], counts[1], counts[2] = counts[0] + null.evidence["fired"], counts[1] + bool(found), counts[2] + 1
    if per_source is not None:
        per_source.update(tally)
    return tuple(map(sum, zip(*tally.values())))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=Path, nargs="+", default=[HISTORIES],
                   help="folders of recorded runs' per-photo loss files (several: their runs pooled)")
    p.add_argument("--part", default="all", help="tune, report or all: whose noise is simulated")
    p.add_argument("--runs", type=int, default=500, help="null histories, and as many divergent ones")
    p.add_argument("--epochs", type=int, default=100, help="epochs per simulated history (stage 1's budget)")
    p.add_argument("--rise", type=float, default=0.05, help="val-loss rise per epoch after the onset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=10, help="a real run's first epochs, left out (still learning)")
    p.add_argument("--smooth", type=int, default=7, help="epochs of the moving mean a residual is taken from")
    p.add_argument("--block", type=int, default=3, help="consecutive residual epochs drawn together")
    rules.Divergence.add_flags(p)
    args = p.parse_args()
    files, srcs = run_files(args.histories, args.part), sources(args.histories, args.part, args.skip, args.smooth)
    if not srcs:
        sys.exit(f"no per-photo loss files (*_d.val_losses.csv) in {', '.join(map(str, args.histories))}")
    rule = rules.Divergence.from_flags(args)
    t0 = time.perf_counter()
    for name, src in srcs.items():
        level, residual = src["val"]
        low, before, after, share = where_it_rose(per_photo(files[name]),
                                                  args.skip, args.smooth)
        print(f"{name}: {len(level)} val photos, level {level.mean():.3f}, {len(residual)} residual epochs, "
              f"epoch-to-epoch sd of the mean {residual.mean(1).std():.3f} "
              f"({np.sqrt(residual.var(0).mean() / len(level)):.3f} were the photos independent; "
              f"{100 * shared_share(residual):.0f} % of the photos' residual variance on one shared pattern); "
              f"past epoch {args.skip} the val loss was "
              f"lowest around epoch {low} "
              f"({before:.3f}), last 10 epochs {after:.3f}, {100 * share:.0f} % of that change in photos over 0.5 "
              "there")
    per_source = {}
    false_fires, found, runs = simulate(srcs, args.runs, args.epochs, args.rise, rule, args.seed, args.block, per_source)
    for name, (fires, hits, n) in per_source.items():
        print(f"  {name}'s noise: false fires {fires}/{n}, found in time and kept near {hits}/{n}")
    print(f"{rule.describe()}; {runs} null and {runs} divergent histories of {args.epochs} epochs (rise {args.rise:g} "
          f"per epoch), noise from {len(srcs)} runs ({args.part}); {time.perf_counter() - t0:.0f} s")
    lo_f, hi_f = intervals.wilson(false_fires, runs)
    lo_p, hi_p = intervals.wilson(found, runs)
    print(f"false-fire {100 * false_fires / runs:.1f} % (95 % CI {100 * lo_f:.1f}-{100 * hi_f:.1f}), "
          f"power {100 * found / runs:.1f} % (95 % CI {100 * lo_p:.1f}-{100 * hi_p:.1f})")


if __name__ == "__main__":
    main()

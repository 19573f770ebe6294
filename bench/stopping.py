"""Replay recorded stage-1 histories and compare the ways of choosing the kept epoch, in seconds.

    python bench/stopping.py                       # bench/histories/*.csv (bench/record_histories.py)
    python bench/stopping.py --histories DIR --markdown

Each history is a metrics.csv of a run trained for every epoch with --watch on a hold-out split.
For every history and way of choosing, it takes the kept epoch and reads the hold-out accuracy
there (watch_acc; no choice reads it). Ways compared:
  old rule     the rule this project shipped before: gap(t) - gap(t-3) > 5 points with no val gain,
               kept epoch t-3; else the raw best val_acc
  new rule     smalldata.recipe.choose with its defaults (noise-aware rule, steady best-val fallback)
  best val     the raw maximum of val_acc (ties: smaller gap, then earlier)
  steady best  smalldata.recipe.steady_best: latest epoch within one SE of the best smoothed val_acc
  last epoch   the last epoch trained
  oracle       the best watch_acc: for scale only, no real choice can know it
It also counts how often a stopping rule stopped while validation was still improving: the
smoothed val_acc (trailing mean over the rule's window) later rose by more than one standard error.
A second table measures what BatchNorm recalibration steadies: the mean absolute epoch-to-epoch
change of val_acc, with and without it (histories *_orig.csv against *_orig-nobn.csv).
"""
import argparse
import csv
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata import recipe  # noqa: E402

WAYS = ("old rule", "new rule", "best val", "steady best", "last epoch", "oracle")


def read(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} | {"epoch": int(r["epoch"])} for r in csv.DictReader(f)]


def old_rule(rows, window=3, jump=5.0):
    """The previous find_divergence and best_epoch, as shipped: (kept epoch, stop epoch)."""
    for i in range(window, len(rows)):
        start, end = rows[i - window], rows[i]
        best_val = max(r["val_acc"] for r in rows[i - window + 1:i + 1])
        if end["gap"] - start["gap"] > jump and best_val <= start["val_acc"]:
            return start["epoch"], end["epoch"]
    return raw_best(rows), rows[-1]["epoch"]


def raw_best(rows):
    return min(rows, key=lambda r: (-r["val_acc"], r["gap"], r["epoch"]))["epoch"]


def new_rule(rows):
    decision = recipe.choose(rows, recipe.Rule())
    return decision["chosen_epoch"], decision["fired_at"] if decision["fired"] else rows[-1]["epoch"]


def kept_epochs(rows):
    """{way: (kept epoch, stop epoch)}"""
    last = rows[-1]["epoch"]
    return {"old rule": old_rule(rows), "new rule": new_rule(rows), "best val": (raw_best(rows), last),
            "steady best": (recipe.steady_best(rows), last), "last epoch": (last, last),
            "oracle": (max(rows, key=lambda r: (r["watch_acc"], -r["epoch"]))["epoch"], last)}


def stopped_while_improving(rows, stop, window=recipe.Rule.window):
    """True when the trailing-mean val_acc rose by more than one SE after the stop epoch."""
    if stop >= rows[-1]["epoch"]:
        return False
    trail = [statistics.mean(r["val_acc"] for r in rows[max(0, i - window + 1):i + 1]) for i in range(len(rows))]
    at_stop = trail[stop - 1]
    return max(trail[stop:]) > at_stop + recipe.se_points(at_stop, rows[stop - 1]["val_n"])


def summarise(histories):
    """{way: {watch: [...], epoch: [...], early: [...]}} over the given {name: rows}."""
    out = {w: {"watch": [], "epoch": [], "early": [], "fired": []} for w in WAYS}
    for rows in histories.values():
        by_epoch = {r["epoch"]: r for r in rows}
        for way, (kept, stop) in kept_epochs(rows).items():
            out[way]["watch"].append(by_epoch[kept]["watch_acc"])
            out[way]["epoch"].append(kept)
            out[way]["early"].append(stopped_while_improving(rows, stop))
            out[way]["fired"].append(stop < rows[-1]["epoch"])
    return out


def mean_sd(values):
    return f"{statistics.mean(values):5.1f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:4.1f}"


def table(title, histories, markdown):
    stats = summarise(histories)
    head = ["way", "hold-out acc at kept epoch", "kept epoch", "rule fired", "stopped while val improving"]
    lines = [f"{title} ({len(histories)} runs)"]
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|---|---|---|---|---|"]
    for way in WAYS:
        s = stats[way]
        rule = way in ("old rule", "new rule")
        fired = f"{sum(s['fired'])}/{len(s['fired'])}" if rule else "-"
        early = f"{sum(s['early'])}/{len(s['early'])}" if rule else "-"
        cells = [way, mean_sd(s["watch"]), mean_sd(s["epoch"]), fired, early]
        lines.append("| " + " | ".join(cells) + " |" if markdown else
                     f"  {cells[0]:12s} {cells[1]:>16s}   epoch {cells[2]:>14s}   fired {cells[3]:>5s}   {cells[4]:>5s}")
    return "\n".join(lines)


def swing(rows, skip=5):
    """Mean absolute change of val_acc from one epoch to the next, after the first `skip` epochs."""
    vals = [r["val_acc"] for r in rows][skip:]
    return statistics.mean(abs(b - a) for a, b in zip(vals, vals[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--histories", type=Path, default=REPO / "bench" / "histories")
    p.add_argument("--markdown", action="store_true", help="print markdown tables (for docs/measurements.md)")
    args = p.parse_args()
    runs = {f.stem: read(f) for f in sorted(args.histories.glob("*.csv"))}
    if not runs:
        sys.exit(f"no histories in {args.histories}; record some with bench/record_histories.py")
    groups = {"all runs": {k: v for k, v in runs.items() if not k.endswith("nobn")}}
    for mix in ("orig", "full"):
        for classes in sorted({k.split("_")[0] for k in runs}):
            chosen = {k: v for k, v in runs.items() if k.startswith(classes + "_") and k.endswith("_" + mix)}
            if chosen:
                groups[f"{classes} classes-{mix}".replace("c", "", 1)] = chosen
    for title, histories in groups.items():
        print(table(title, histories, args.markdown), end="\n\n")
    pairs = [(k, k + "-nobn") for k in runs if k.endswith("_orig") and k + "-nobn" in runs]
    if pairs:
        print("val_acc swing, mean |change| from one epoch to the next (epochs 6 on):")
        for with_bn, without in pairs:
            print(f"  {with_bn:14s} recalibrated BN {swing(runs[with_bn]):5.1f} points   "
                  f"running averages {swing(runs[without]):5.1f} points")
        print(f"  mean           recalibrated BN {statistics.mean(swing(runs[a]) for a, _ in pairs):5.1f} points   "
              f"running averages {statistics.mean(swing(runs[b]) for _, b in pairs):5.1f} points")


if __name__ == "__main__":
    main()

"""Which epoch should stage 1 keep? Every way of choosing, replayed on recorded histories, scored on the
test photos no choice reads, with paired differences and 95 % intervals, tuning and reporting apart.

    python bench/stopping.py --histories /tmp/smalldata-bench/ablation/histories     # bench/ablation.py's
    python bench/stopping.py --histories bench/histories/vgg13_bn-64 --markdown      # our evidence
    python bench/stopping.py --replay checkpoints/1e-4/metrics.csv [--rule ... --patience 3 ...]

A history is a run of model_1e-4.py trained for its whole budget (--no-early-stop) with --watch on a
test split: its metrics.csv and watch.csv (which test photos each epoch got right). For each history
and way of choosing, the kept epoch's test correctness is read from watch.csv; every way is then
compared with the last epoch, the steady best and the best-val epoch on the same photos (paired
bootstrap over runs and photos, smalldata.intervals). Runs whose name starts with "tune" are the
tuning part (where thresholds were chosen), the others the reporting part; the two are printed apart.
Ways:
  divergence z=Z p=P  the recipe's rule (smalldata.rule.Divergence) with threshold Z and patience P
  steady best         the latest epoch within one SE of the best smoothed val_acc
  last epoch          the last epoch trained
  best val            the raw maximum of val_acc (first on a tie)
  emaT, swa           the weight average at the last epoch (columns of --measure-averages)
  oracle              the best test accuracy: for scale only, no real choice can know it

--replay prints, as JSON, what the rule (the default, or the one the flags give) decides on any
metrics.csv that model_1e-4.py wrote, older ones included: where a column it needs is missing, it is
estimated and `reason` says so. Under any other rule than divergence it adds what the recipe's divergence
rule would have done (divergence_rule_would), as model_1e-4.py's divergence.json does.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ablation import read_history  # noqa: E402
from smalldata import intervals, rule as rules  # noqa: E402

RULE_GRID = [(z, p) for z in (2.0, 3.0) for p in (3, 5)]
BASELINES = ("last epoch", "steady best", "best val")


def ways(rows):
    """{way: the kept epoch's test correctness (a 0/1 string)} for one history."""
    trained = [r for r in rows if r["epoch"] > 0]
    at = {r["epoch"]: r for r in trained}
    out = {}
    for z, patience in RULE_GRID:
        decision = rules.Divergence(z=z, patience=patience).observe(trained)
        out[f"divergence z={z:g} p={patience}"] = at[decision.chosen]["watch_correct"]
    out["steady best"] = at[rules.SteadyBest().observe(trained).chosen]["watch_correct"]
    out["last epoch"] = trained[-1]["watch_correct"]
    out["best val"] = max(trained, key=lambda r: (r["val_acc"], -r["epoch"]))["watch_correct"]
    for key in sorted(k for k in trained[-1] if k.endswith("_watch_correct") and k != "watch_correct"):
        out[key[:-len("_watch_correct")]] = trained[-1][key]
    out["oracle"] = max(trained, key=lambda r: (r["watch_acc"], -r["epoch"]))["watch_correct"]
    return out


def fired(rows, z, patience):
    return rules.Divergence(z=z, patience=patience).observe([r for r in rows if r["epoch"] > 0]).evidence["fired"]


def table(title, histories, markdown):
    per_run = {name: ways(rows) for name, rows in histories.items()}
    names = list(next(iter(per_run.values())))
    head = ["way", "test top-1 %"] + [f"minus {b}" for b in BASELINES]
    lines = [f"{title}: {len(histories)} runs ({', '.join(histories)}); mean over runs, 95 % bootstrap "
             "interval over runs and photos; differences paired on the same photos, in points"]
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for way in names:
        runs = [per_run[r][way] for r in histories]
        cells = [way, intervals.describe(*intervals.bootstrap(runs), unit="")]
        for base in BASELINES:
            cells.append("-" if way == base else intervals.describe(
                *intervals.bootstrap(runs, [per_run[r][base] for r in histories]), unit=""))
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  " + "  ".join(
            f"{c:<24}" if i == 0 else f"{c:<30}" for i, c in enumerate(cells)))
    counts = ", ".join(f"z={z:g} p={p}: {sum(fired(rows, z, p) for rows in histories.values())}/{len(histories)}"
                       for z, p in RULE_GRID)
    lines.append(f"\nthe divergence rule fired in: {counts}")
    return "\n".join(lines)


def replay(args):
    rows = [r for r in read_history(Path(args.replay)) if r["epoch"] > 0]
    rule = rules.from_args(args)
    decision = rule.observe(rows)
    out = {"rule": rule.settings(), **rules.outcome(decision)}
    if not isinstance(rule, rules.Divergence):  # (as divergence.json: what the recipe's rule would have done)
        out["divergence_rule_would"] = rules.outcome(rules.from_settings("divergence", vars(args)).observe(rows))
    print(json.dumps(out, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=Path, default=REPO / "bench" / "histories" / "vgg13_bn-64")
    p.add_argument("--configs", nargs="+", default=["d", "a"], help="which configurations' histories (ablation.py)")
    p.add_argument("--markdown", action="store_true", help="markdown tables (for docs/measurements.md)")
    p.add_argument("--replay", help="a metrics.csv: print the rule's decision on it as JSON")
    rules.add_args(p)
    args = p.parse_args()
    if args.replay:
        return replay(args)
    for config in args.configs:
        runs = {f.stem: read_history(f) for f in sorted(args.histories.glob(f"*_{config}.csv"))}
        runs = {k: v for k, v in runs.items() if "watch_correct" in v[-1]}
        if not runs:
            continue
        for part in ("tune", "report"):
            chosen = {k: v for k, v in runs.items() if k.startswith("tune") == (part == "tune")}
            if chosen:
                print(table(f"configuration {config}, {'tuning' if part == 'tune' else 'reporting'} part", chosen,
                            args.markdown), end="\n\n")


if __name__ == "__main__":
    main()

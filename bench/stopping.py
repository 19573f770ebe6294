"""Which epoch should stage 1 keep? Every way of choosing, replayed on recorded histories, scored on the
test photos no choice reads; intervals over runs with the per-run differences; tuning and reporting apart.

    python bench/stopping.py --histories bench/histories/vgg13_bn-64-div       # our divergence evidence
    python bench/stopping.py --histories DIR --markdown                          # tables for the docs
    python bench/stopping.py --histories DIR1 DIR2                                # runs of several folders together
    python bench/stopping.py --replay checkpoints/stage1/metrics.csv [--rule ... --noise-z 3 ...]

A history is a run of model_1e-4.py trained for its whole budget (--rule last: nothing stops it) with
--watch on a test split: its metrics.csv, watch.csv (which test photos each epoch got right) and
val_losses.csv / train_losses.csv (each photo's loss every epoch), as bench/ablation.py copies them.
For each history and way of choosing, the kept epoch's test correctness is read from watch.csv; every
way is compared with the last epoch, the steady best and the best-val epoch on the same photos: the
mean over runs with a 95 % t interval over runs, and each run's difference. Runs whose name starts with
"tune" are the tuning part (where settings were chosen), the others the reporting part.
Ways:
  divergence          the recipe's rule (smalldata.rule.Divergence) as stage 1 runs it by default:
                      divergence.pth, the epoch it keeps
  swa.pth, ema.pth    the weight averages stage 1 writes beside it, as they stand where the stage ends
                      (where the rule fired, or the last epoch); needs histories recorded with
                      ablation.py --candidates
  divergence z= r=    the rule with other thresholds and reaches (the tuning grid)
  steady best         the latest epoch within one SE of the best smoothed val_acc
  last epoch          the last epoch trained
  best val            the raw maximum of val_acc (first on a tie)
  oracle              the best test accuracy: for scale only, no real choice can know it
With both parts, one more table over all runs: each way against divergence.pth and the last epoch.
Then, per run, where the divergence rule fired and kept, against the epoch of the lowest val loss and the
best test accuracy over the whole run (hindsight).

--replay prints, as JSON, what the rule (the default, or the one the flags give) decides on any
metrics.csv that model_1e-4.py wrote, older ones included: where the per-photo losses were not
recorded, the rule says how it judged instead. Under another rule it adds what the recipe's divergence
rule would have done (divergence_rule_would), as stage 1's divergence.json does.
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

GRID = [(z, reach) for z in (3.5, 4.0, 5.0) for reach in (10, 15)]
BASELINES = ("last epoch", "steady best", "best val")


def accuracy(bits):
    return 100 * bits.count("1") / len(bits)


def ways(rows):
    """{way: the kept epoch's test correctness (a 0/1 string)} for one history."""
    trained = [r for r in rows if r["epoch"] > 0]
    at = {r["epoch"]: r for r in trained}
    decision = rules.Divergence().observe(trained)
    out = {"divergence": at[decision.chosen]["watch_correct"]}
    end = at[decision.evidence["fired_at"] if decision.evidence.get("fired") else trained[-1]["epoch"]]
    for average in ("swa", "ema"):
        if f"{average}_watch_correct" in end:
            out[f"{average}.pth"] = end[f"{average}_watch_correct"]
    for z, reach in GRID:
        out[f"divergence z={z:g} r={reach}"] = at[rules.Divergence(z=z, reach=reach).observe(trained).chosen][
            "watch_correct"]
    out["steady best"] = at[rules.SteadyBest().observe(trained).chosen]["watch_correct"]
    out["last epoch"] = trained[-1]["watch_correct"]
    out["best val"] = max(trained, key=lambda r: (r["val_acc"], -r["epoch"]))["watch_correct"]
    out["oracle"] = max(trained, key=lambda r: (r["watch_acc"], -r["epoch"]))["watch_correct"]
    return out


def table(title, histories, markdown, baselines=BASELINES):
    per_run = {name: ways(rows) for name, rows in histories.items()}
    names = list(next(iter(per_run.values())))
    head = ["way", "test top-1 %"] + [f"minus {b}" for b in baselines]
    lines = [f"{title}: {len(histories)} runs ({', '.join(histories)}); mean over runs with a 95 % t interval over "
             "runs and each run's value; differences paired on the same photos, in points"]
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for way in names:
        runs = [per_run[r][way] for r in histories]
        cells = [way, intervals.describe_runs([accuracy(b) for b in runs])]
        for base in baselines:
            cells.append("-" if way == base else intervals.describe_runs(
                [accuracy(a) - accuracy(per_run[r][base]) for a, r in zip(runs, histories)], signed=True))
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  " + "\n      ".join(cells))
    fired = {f"z={z:g} r={reach}": sum(rules.Divergence(z=z, reach=reach).observe(
        [r for r in rows if r["epoch"] > 0]).evidence["fired"] for rows in histories.values()) for z, reach in GRID}
    lines.append("\nthe divergence rule fired in: " + ", ".join(f"{k}: {v}/{len(histories)}" for k, v in fired.items()))
    return "\n".join(lines)


def where(histories, markdown):
    """Per run: the default rule's fire and kept epochs against the hindsight epochs."""
    head = ["run", "fired at", "kept", "lowest val loss (whole run)", "best test (whole run)", "test at kept",
            "test at best test", "test at last"]
    lines = ["", "Where the divergence rule fired and what it kept, against hindsight:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if markdown else ["  " + "  ".join(head)]
    for name, rows in histories.items():
        trained = [r for r in rows if r["epoch"] > 0]
        decision = rules.Divergence().observe(trained)
        lowest = rules.lowest_loss(trained)
        best = max(trained, key=lambda r: (r["watch_acc"], -r["epoch"]))
        kept = next(r for r in trained if r["epoch"] == decision.chosen)
        cells = [name, str(decision.evidence.get("fired_at", "-")), str(decision.chosen), str(lowest),
                 str(best["epoch"]), f"{kept['watch_acc']:.0f}", f"{best['watch_acc']:.0f}",
                 f"{trained[-1]['watch_acc']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |" if markdown else "  " + "  ".join(cells))
    return "\n".join(lines)


def replay(args):
    rows = [r for r in read_history(Path(args.replay)) if r["epoch"] > 0]
    rule = rules.from_args(args)
    out = {"rule": rule.settings(), **rules.outcome(rule.observe(rows))}
    if rule.name != rules.DEFAULT:  # (as divergence.json: what the recipe's rule would have done)
        out[f"{rules.DEFAULT}_rule_would"] = rules.outcome(rules.from_args(args, rules.DEFAULT).observe(rows))
    print(json.dumps(out, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--histories", type=Path, nargs="+", default=[REPO / "bench" / "histories" / "vgg13_bn-64-div"],
                   help="folders of recorded histories, read together")
    p.add_argument("--configs", nargs="+", default=["d"], help="which configurations' histories (ablation.py)")
    p.add_argument("--markdown", action="store_true", help="markdown tables (for docs/measurements.md)")
    p.add_argument("--replay", help="a metrics.csv: print the rule's decision on it as JSON")
    rules.add_args(p)
    args = p.parse_args()
    if args.replay:
        return replay(args)
    for config in args.configs:
        runs = {f.stem: read_history(f) for folder in args.histories for f in sorted(folder.glob(f"*_{config}.csv"))}
        runs = {k: v for k, v in runs.items() if "watch_correct" in v[-1]}
        for part in ("tune", "report"):
            chosen = {k: v for k, v in runs.items() if k.startswith("tune") == (part == "tune")}
            if chosen:
                print(table(f"configuration {config}, {'tuning' if part == 'tune' else 'reporting'} part", chosen,
                            args.markdown))
                print(where(chosen, args.markdown), end="\n\n")
        if len({k.startswith("tune") for k in runs}) == 2:  # (no choice between the candidates was tuned)
            print(table(f"configuration {config}, all runs: the candidates against the recipe's choice", runs,
                        args.markdown, baselines=("divergence", "last epoch")), end="\n\n")


if __name__ == "__main__":
    main()

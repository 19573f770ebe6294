"""What a training stage says and records: the banner, a line and the metric files each epoch, and
at the end each output with its score and the decision behind it (divergence.json, final.json)."""
import sys

from . import cache, files, intervals, plots, rule as rules, runtime
from .cli import say
from .model import count_parameters
from .train import metric_columns, rng_state, training_state


def banner(run, weights_note):
    spec, meta, data, loop = run.spec, run.meta, run.data, run.loop
    classes, d, o = meta["classes"], spec.data, spec.optim
    say(f"== {spec.title}")
    say(f"{runtime.describe(loop.device, loop.amp)}, compile {'on' if spec.hardware.compile else 'off'}")
    say(f"classes ({len(classes)}): {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
    say("images: " + ", ".join(f"{k} {v}" for k, v in data["counts"].items()) + f" at {meta['img_size']} px")
    say("decoded images: " + ", ".join(f"{k} {v}" for k, v in data["how"].items())
        + ("" if d.no_cache else f" (decode cache {d.cache_dir}: once per image size, rebuilt when a file changes)"))
    others = None if d.no_cache else cache.describe_others(d.cache_dir, meta["img_size"])
    if others:
        say(others)
    say(f"data: {data['where']}")
    if data["val_missing"]:
        say(f"validation has no photo of {', '.join(data['val_missing'])} (--allow-missing-val-classes): every "
            "choice below is made on the other classes")
    say(f"model {meta['arch']} {count_parameters(loop.model):,} parameters; {weights_note}; Adam lr {o.lr:g}, "
        f"weight decay {o.weight_decay:g}, batch {o.batch_size}, epochs {run.first_epoch}..{o.epochs}")
    say("BatchNorm statistics: " + ("running averages (--no-precise-bn)" if o.no_precise_bn else
                                    "exact, of the training originals, recomputed before each evaluation"))
    say(f"augmentation: {o.augment} (--augment)")
    say(f"rule: {spec.rule.describe()}")
    for average in loop.averages.values():
        say(f"kept beside it: {run.paths.output(average.name).name}, {average.definition()}")
    if d.watch:
        say(f"watch: {d.watch} is scored every epoch (watch_acc in metrics.csv) for analysis only; no decision reads it")
    say(f"outputs in {run.paths.dir} (resolved arguments: {run.paths.args})")


def compact(decision):
    """A decision as the stage's state keeps it (JSON; the tests are in the decision's .json)."""
    evidence = {k: v for k, v in decision.evidence.items() if k != "tests"}
    return {"stop": decision.stop, "chosen_epoch": decision.chosen, "reason": decision.reason, **evidence}


def epoch_done(run, decision):
    """After an epoch: the stage's state, the metric files, last.pth (when due), the console line."""
    row = run.history[-1]
    run.state.update(decision=compact(decision), stopped_early=decision.stop,
                     marks={decision.chosen: "kept"} if decision.stop else {})
    write_progress(run)
    ranks = runtime.gather(rng_state(run.loop))  # (every epoch, on every worker: a save is due on rank 0 alone)
    run.keeper.save_last(row["epoch"], lambda optimizer: training_state(run.loop, run.history, run.state, optimizer,
                                                                        ranks))
    say(f"epoch {row['epoch']:3d}  train {row['train_acc']:6.2f}%  val {row['val_acc']:6.2f}%  gap {row['gap']:6.2f}  "
        f"val_loss {row['val_loss']:.4f}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s")
    if decision.stop:
        say(decision.reason)


def write_progress(run):
    """metrics.csv, the per-photo files and curves.png, on the keeper's writer thread."""
    if not run.main:
        return
    rows, writer, paths = list(run.history), run.keeper.writer, run.paths
    columns = metric_columns(run.loop.averages)
    writer.submit("metrics", files.write_csv, paths.metrics, columns, [[r.get(c, "") for c in columns] for r in rows])
    if run.spec.data.watch:  # which watched photos each epoch got right, in file order: paired comparisons
        bits = ["watch_correct"] + [f"{a}_watch_correct" for a in run.loop.averages]
        writer.submit("watch", files.write_csv, paths.watch, ["epoch"] + bits,
                      [[r["epoch"]] + [r.get(c, "") for c in bits] for r in rows])
    for split in ("val", "train"):  # each photo's loss every epoch: changes between epochs judged paired
        names = run.data["names"]["orig" if split == "train" else split]
        writer.submit(f"{split}_losses", files.write_csv, paths.losses(split), ["epoch", "correct", *names],
                      [[r["epoch"], r[f"{split}_correct"], *r[f"{split}_losses"]] for r in rows
                       if f"{split}_losses" in r])
    writer.submit("curves", plots.elsewhere, plots.training_curves, rows, paths.curves, run.spec.title,
                  dict(run.state.get("marks", {})))


# ---------------------------------------------------------------- the end

def summary(run, decision, outputs, replayed):
    """Each output with its val top-1 (95 % Wilson interval) and, with --watch, its watch top-1; which one
    the next stage starts from; the decision's .json. `outputs`: {name: (epoch, decision, averaged)}."""
    history, paths = run.history, run.paths
    rows = {r["epoch"]: r for r in history}
    if not decision.stop:
        say(decision.reason)
    for other in replayed:
        say(f"(the recipe's {rules.DEFAULT} rule, replayed on this history: {other.reason})")
    lines, table, warnings = [], [], []
    for name, (epoch, chosen, averaged) in outputs.items():
        scores = averaged["metrics"] if averaged else rows[epoch]
        n, acc = rows[epoch]["val_n"], scores["val_acc"]
        lo, hi = intervals.wilson(round(acc * n / 100), n)
        watch = f", watch {scores['watch_acc']:.1f} %" if "watch_acc" in scores else ""
        what = averaged["weights"] if averaged else f"epoch {epoch}"
        lines.append(f"  {paths.output(name)}: {what}; val {intervals.describe(acc, 100 * lo, 100 * hi)}{watch}")
        table.append({"file": paths.output(name).name, "epoch": epoch, "weights": what, "val_acc": acc,
                      "val_ci95": [round(100 * lo, 1), round(100 * hi, 1)], "watch_acc": scores.get("watch_acc")})
        if name == run.spec.outputs[0][0] and rules.near_chance(acc, n, len(run.data["classes"])):
            warnings.append(f"{paths.output(name).name}'s val_acc {acc:.1f} % is within noise of chance "
                            f"({100 / len(run.data['classes']):.1f} %): the model has not learnt much")
            say(f"warning: {warnings[-1]}", file=sys.stderr)
    first = paths.output(run.spec.outputs[0][0])
    if history[0]["epoch"] == 0:  # the starting weights were measured: where the stage took them
        steady = rules.steady_best(history, 2, set(run.keeper.kept))
        say(f"\n{'':22}{'val_acc':>9}{'gap':>9}")
        for label, epoch in (("start (ep 0)", 0), (f"last (ep {history[-1]['epoch']})", history[-1]["epoch"]),
                             (f"steady best (ep {steady})", steady)):
            say(f"{label:22}{rows[epoch]['val_acc']:9.2f}{rows[epoch]['gap']:9.2f}")
    say("kept:\n" + "\n".join(lines))
    say(f"the next stage starts from {first.name} by default; another with --init, e.g. --init "
        f"{paths.output(list(outputs)[-1])}" if len(outputs) > 1 else f"result: {first}")
    run.state["marks"] = marks(run, outputs, replayed)
    if run.main:
        write_decision(run, paths.decision(run.spec.outputs[0][0]), decision, warnings, table, replayed)


def marks(run, outputs, replayed):
    out = {epoch: "would keep" for epoch in (r.chosen for r in replayed if r.evidence.get("fired"))}
    for name, (epoch, _, averaged) in outputs.items():
        if averaged is None:
            out[epoch] = run.paths.output(name).name
    return out


def write_decision(run, path, decision, warnings, candidates, replayed):
    """Why the first output holds its epoch: the rule, its reason and numbers, every epoch's noise, each
    output's score, and what the rules replayed beside it would have done on the same history."""
    history = run.history
    good, sv = rules.qualifying(history, 2)
    epochs = [{"epoch": r["epoch"], "train_acc": r["train_acc"], "val_acc": r["val_acc"], "gap": r["gap"],
               "val_se": round(rules.se_points(r["val_acc"], r["val_n"]), 3), "smoothed_val": round(v, 3),
               "gap_se": round(rules.gap_se(r), 3), "val_loss": r["val_loss"], "val_loss_se": r.get("val_loss_se")}
              for r, v in zip(history, sv)]
    body = {"chosen_epoch": decision.chosen, "reason": decision.reason, "stopped_early": decision.stop,
            "checkpoint": str(run.paths.output(run.spec.outputs[0][0])), "warnings": warnings,
            "rule": run.spec.rule.settings(), **{k: v for k, v in decision.evidence.items() if k != "tests"},
            "outputs": candidates, "val_lacks_classes": run.data["val_missing"]}
    for rule, other in zip(run.spec.replayed, replayed):
        body[f"{rule.name}_rule_would"] = rules.outcome(other)
    tests = next((d.evidence.get("tests") for d in [decision, *replayed] if d.evidence.get("tests")), [])
    files.write_json(path, {**body, "epochs_within_one_se_of_best_val": good, "epochs": epochs, "tests": tests})

"""The two training stages of the recipe: their shared flags, start, resume, per-epoch bookkeeping and end.

Stage 1 (lr 1e-4) keeps the epoch where the train/val gap starts to widen (recipe.choose);
stage 2 (lr 1e-7) starts there and keeps its last epoch (or, with --keep best, its steady best) as final.pth.
"""
import shutil
import sys
from pathlib import Path

from . import IMAGENET_MEAN, IMAGENET_STD, checkpoint, cli, files, plots, recipe, runtime
from .cli import UsageError, say
from .data import DEVICE_SHARE, load_training_data
from .folders import refuse_overlap
from .keeper import Keeper
from .model import build_model, count_parameters, imagenet_available
from .train import METRIC_COLUMNS, fit, make_loop, restore_training_state, training_state

# Arguments that define a run: a rerun with other values must not silently continue the old one.
RUN_DEFINING = ("data", "arch", "lr", "batch_size", "img_size", "weights", "init", "init_id", "seed", "no_br",
                "no_ocm", "weight_decay", "gap_window", "patience", "min_epochs", "noise_z", "deterministic",
                "no_precise_bn", "keep")
STAGE_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png", "divergence.json", "args.json")


def add_training_args(p, lr, epochs):
    """The flags both training scripts share."""
    p.add_argument("--data", type=cli.existing_dir, default="data",
                   help="folder with train/ and val/, and optionally br/ and ocm/")
    p.add_argument("--out", type=cli.output_dir, default="checkpoints", help="where checkpoints, metrics and plots go")
    p.add_argument("--lr", type=cli.positive_float, default=lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.0, help="Adam weight decay (our default)")
    p.add_argument("--epochs", type=cli.positive_int, default=epochs, help="most epochs to train")
    p.add_argument("--batch-size", type=cli.positive_int, default=32,
                   help="images per step; a last, smaller batch of an epoch is left out")
    p.add_argument("--no-br", action="store_true", help="leave data/br out of the training set")
    p.add_argument("--no-ocm", action="store_true", help="leave data/ocm out of the training set")
    p.add_argument("--watch", type=cli.existing_dir,
                   help="labelled folder (usually data/test) scored every epoch as watch_acc in metrics.csv, "
                        "for analysis only: no decision reads it")
    p.add_argument("--no-cache", action="store_true",
                   help="decode every photo instead of reading, or writing, each folder's decode cache "
                        "(<folder>/.cache/: decoded once per image size, rebuilt when a file changes)")
    p.add_argument("--data-on", choices=["auto", "device", "stream"], default="auto",
                   help="device: the whole decoded set in the training device's memory (GPU memory, or RAM on "
                        "a CPU), batches cut there; stream: batches read from the memory-mapped decode cache a "
                        f"few ahead; auto: device when the set takes under {100 * DEVICE_SHARE:.0f}%% of the free "
                        "memory")
    p.add_argument("--no-precise-bn", action="store_true",
                   help="measure with BatchNorm's running averages instead of statistics recomputed on the "
                        "training originals before each evaluation (for comparison only)")
    p.add_argument("--keep-all", action="store_true",
                   help="write every epoch's weights to <stage>/epochs/ (about 0.5 GB each for VGG-13)")
    p.add_argument("--resume", type=cli.existing_file,
                   help="continue from this last.pth exactly (epochs, optimizer, RNG, history)")
    p.add_argument("--fresh", action="store_true", help="delete this stage's earlier run and start over")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms: CPU runs repeat bit for bit anyway; on a GPU cuBLAS and "
                        "cuDNN repeat too, but a few kernels (adaptive pooling's backward) have no "
                        "deterministic version and only warn, so GPU runs may still differ slightly")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first epoch)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm) "
                        "instead of each worker's share")
    cli.add_device_arg(p)


# ---------------------------------------------------------------- start and resume

def prepare_out(args, stage_name):
    """The stage folder, after refusing an --out inside --data and clearing a killed run's temporaries."""
    out = Path(args.out)
    refuse_overlap(out, args.data, "--out", "--data", "the next run would read the checkpoints folder as a "
                   "class; choose an --out outside the data", both_ways=False)
    if runtime.is_main():
        files.remove_stale_temps(out)
    return out, out / stage_name


def previous_run(args, stage_dir):
    """The last.pth to continue from, or None for a fresh start.

    --resume PATH continues that file. Without it, a last.pth in the stage folder is continued when it
    was made with the same run-defining arguments (rerunning the same command after a crash picks up
    where it stopped), and refused when they differ, unless --fresh starts over.
    """
    last = Path(stage_dir) / "last.pth"
    if args.fresh:
        if runtime.is_main():
            for name in STAGE_FILES:
                (Path(stage_dir) / name).unlink(missing_ok=True)
            shutil.rmtree(Path(stage_dir) / "epochs", ignore_errors=True)
        return None
    path = Path(args.resume) if args.resume else last if last.exists() else None
    if path is None:
        return None
    ckpt = checkpoint.load(path)
    if "history" not in ckpt:
        raise UsageError(f"{path} is not a last.pth (it has no training history): --resume takes a last.pth; "
                         "to start from a chosen epoch use --weights PATH (stage 1) or --init PATH (stage 2)")
    old = ckpt["args"]
    differ = [k for k in RUN_DEFINING if k in old and str(old[k]) != str(vars(args).get(k))]
    if differ and not args.resume:
        raise UsageError(f"{stage_dir} holds a run made with other arguments ("
                         + ", ".join(f"{k}: {old[k]} -> {vars(args).get(k)}" for k in differ)
                         + "); pass --resume to continue it, or --fresh to start over (deletes its files)")
    for k in RUN_DEFINING:  # a resumed run keeps the arguments that made it
        if k in old:
            setattr(args, k, old[k])
    return ckpt


def finished(ckpt, args, stage_dir):
    done = ckpt is not None and ckpt.get("finished") and not args.resume and (
        ckpt["stage"].get("stopped_early") or ckpt["epoch"] >= args.epochs)
    if done:
        say(f"{stage_dir}: already finished (epoch {ckpt['epoch']}); nothing to do. Use --fresh to train again.")
    return done


def restore_named(target, stage_dir, epoch):
    """A finished stage whose named checkpoint is gone (deleted, or lost to a kill): link it again."""
    if Path(target).exists() or not runtime.is_main():
        return
    source = Path(stage_dir) / "epochs" / f"epoch_{epoch:03d}.pth"
    if not source.exists():
        raise UsageError(f"{target} is missing and the weights of its epoch ({epoch}) are no longer kept; "
                         "rerun with --fresh")
    files.link_or_copy(source, target)
    say(f"{target} was missing; written again from {source} (epoch {epoch})")


def initial_model(args, classes):
    """Stage 1's starting model and a note for the banner: ImageNet, none, or one of our checkpoints."""
    if args.weights == "none":
        return build_model(args.arch, len(classes)), "from scratch (--weights none)"
    if args.weights == "imagenet":
        note = "ImageNet weights" + ("" if imagenet_available(args.arch) else " (downloading)")
        return build_model(args.arch, len(classes), "imagenet"), note
    ckpt = checkpoint.load(args.weights)
    if ckpt["arch"] != args.arch:
        raise UsageError(f"{args.weights} is a {ckpt['arch']} checkpoint, not {args.arch}; pass --arch {ckpt['arch']}")
    model = build_model(args.arch, len(classes))
    state = ckpt["model"]
    if ckpt["classes"] != list(classes):  # other classes: keep the body, start a fresh head
        head = {k for k, v in model.state_dict().items() if k in state and v.shape != state[k].shape}
        state = {k: v for k, v in state.items() if k not in head}
        checkpoint.load_weights(model, state, args.weights, args.arch, strict=False)
        return model, f"body of {args.weights} (other classes: new head)"
    checkpoint.load_weights(model, state, args.weights, args.arch)
    return model, f"weights of {args.weights} (epoch {ckpt['epoch']})"


# ---------------------------------------------------------------- one stage's run

class StageRun:
    """The glue of one stage: the loop (train.py), its files (keeper.py) and its history."""

    def __init__(self, args, stage_dir, title, model, data, meta, prev, runtime_, problems):
        self.args, self.dir, self.title, self.data, self.problems = args, Path(stage_dir), title, data, problems
        device, amp = runtime_
        self.loop = make_loop(model, lr=args.lr, weight_decay=args.weight_decay, device=device, amp=amp,
                              mean=meta["mean"], std=meta["std"], batch_size=args.batch_size, seed=args.seed,
                              compile=args.compile, precise_bn=not args.no_precise_bn, sync_bn=args.sync_bn)
        self.main = runtime.is_main()  # under torchrun only rank 0 writes files
        self.keeper = Keeper(stage_dir, {**meta, "args": args}, args.keep_all, writes=self.main)
        self.history, self.state, self.first_epoch = [], {}, 1
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            files.write_json(self.dir / "args.json", checkpoint.json_args(args))
        if prev:
            restore_training_state(self.loop, prev)
            self.keeper.restore(prev)
            self.history, self.state = list(prev["history"]), dict(prev["stage"])
            self.first_epoch = prev["epoch"] + 1
            say(f"resuming after epoch {prev['epoch']} ({len(self.history)} epochs of history)"
                + ("" if prev.get("optimizer") else "; a finished stage keeps no Adam state, so Adam starts afresh"))

    def banner(self, weights_note, meta):
        a, classes = self.args, meta["classes"]
        say(f"== {self.title}")
        say(f"{runtime.describe(self.loop.device, self.loop.amp)}, compile {'on' if a.compile else 'off'}")
        say(f"classes ({len(classes)}): {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        say("images: " + ", ".join(f"{k} {v}" for k, v in self.data["counts"].items()) + f" at {meta['img_size']} px")
        say("decoded images: " + ", ".join(f"{k} {v}" for k, v in self.data["how"].items())
            + ("" if a.no_cache else " (each folder's .cache/: decoded once per image size, rebuilt when a "
                                     "file changes)"))
        say(f"data: {self.data['where']}")
        say(f"model {meta['arch']} {count_parameters(self.loop.model):,} parameters; {weights_note}; Adam lr "
            f"{a.lr:g}, weight decay {a.weight_decay:g}, batch {a.batch_size}, epochs {self.first_epoch}..{a.epochs}")
        say("BatchNorm statistics: " + ("running averages (--no-precise-bn)" if a.no_precise_bn else
                                        "recomputed on the training originals before each evaluation"))
        if a.watch:
            say(f"watch: {a.watch} is scored every epoch (watch_acc in metrics.csv) for analysis only; "
                "no decision reads it")
        say(f"outputs in {self.dir} (resolved arguments: {self.dir / 'args.json'})")

    def keep(self, row, needed):
        """After an epoch: host weights of the epochs still needed, metrics.csv, curves.png, last.pth."""
        self.keeper.snapshot(self.loop.model, row, needed)
        self.write_progress()
        if row["epoch"] > 0:  # (stage 2's epoch 0 is its --init checkpoint, measured again on a rerun)
            self.keeper.save_last(row["epoch"], self.training_state)

    def training_state(self, optimizer):
        return training_state(self.loop, self.history, self.state, optimizer)

    def write_progress(self):
        if not self.main:
            return
        rows, writer = list(self.history), self.keeper.writer
        writer.submit("metrics", files.write_csv, self.dir / "metrics.csv", METRIC_COLUMNS,
                      [[r.get(c, "") for c in METRIC_COLUMNS] for r in rows])
        writer.submit("curves", plots.training_curves, rows, self.dir / "curves.png", self.title,
                      dict(self.state.get("marks", {})), getattr(self.args, "gap_window", recipe.Rule.window))

    def fit(self, on_epoch, eval_first=False):
        fit(self.loop, self.data, self.first_epoch, self.args.epochs, on_epoch, eval_first)

    def finish(self, named):
        """last.pth (finished) with the epoch files of the named checkpoints {path: epoch}, then those."""
        self.keeper.writer.flush()  # the last periodic last.pth lands whole before the final one replaces it
        self.keeper.kept = {e: v for e, v in self.keeper.kept.items() if e in named.values()}
        last = self.history[-1]["epoch"]
        self.keeper.save_last(last, self.training_state, finished=True)
        for path, epoch in named.items():
            self.keeper.name(path, epoch)
        self.write_progress()
        self.keeper.close()
        runtime.teardown()
        say(f"metrics: {self.dir / 'metrics.csv'}   curves: {self.dir / 'curves.png'}")
        self.problems.summary()
        return self.problems.exit_code()


def open_stage(args, stage_dir, title, prev, init=None):
    """Decode the data and build the StageRun; `init` is the checkpoint stage 2 starts from."""
    problems = cli.Problems()
    device_amp = runtime.setup(args.device, args.seed, args.deterministic)
    workers = runtime.world()[1]
    if args.batch_size % workers:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch; it must divide among the "
                         f"{workers} torchrun workers (try {args.batch_size - args.batch_size % workers or workers})")
    if args.sync_bn and (workers == 1 or device_amp[0].type != "cuda"):
        raise UsageError("--sync-bn is for torchrun runs on GPUs (PyTorch's SyncBatchNorm has no CPU version)")
    source = prev or init
    img_size = source["img_size"] if source else args.img_size
    with runtime.main_first():  # rank 0 writes the decode cache, the other workers read it
        data = load_training_data(args.data, img_size, problems, source and source["classes"], not args.no_br,
                                  not args.no_ocm, args.watch, not args.no_cache, device_amp[0], args.data_on)
    if source:
        model = checkpoint.build_from(source, args.resume or stage_dir / "last.pth" if prev else args.init)
        meta = {k: source[k] for k in ("arch", "classes", "img_size", "mean", "std")}
        note = "resumed" if prev else f"weights of {args.init} (epoch {init['epoch']}), fresh Adam"
    else:
        model, note = initial_model(args, data["classes"])
        meta = dict(arch=args.arch, classes=data["classes"], img_size=img_size, mean=list(IMAGENET_MEAN),
                    std=list(IMAGENET_STD))
    run = StageRun(args, stage_dir, title, model, data, meta, prev, device_amp, problems)
    run.banner(note, meta)
    return run


# ---------------------------------------------------------------- stage 1

def stage1(args):
    """Train at lr 1e-4 and keep the epoch where the gap starts to widen; returns the exit code."""
    out, stage_dir = prepare_out(args, "1e-4")
    prev = previous_run(args, stage_dir)
    if finished(prev, args, stage_dir):
        restore_named(out / "divergence.pth", stage_dir, prev["stage"]["decision"]["chosen_epoch"])
        return cli.EXIT_OK
    rule = recipe.Rule(args.gap_window, args.patience, args.min_epochs, args.noise_z)
    run = open_stage(args, stage_dir, f"stage 1: {args.arch} lr {args.lr:g}", prev)
    say(f"divergence rule: from epoch {rule.min_epochs}, over {rule.window}-epoch windows, the gap must widen "
        f"beyond {rule.z:g} standard errors for {rule.patience} epochs in a row (details: divergence.json)"
        + ("; --no-early-stop: training goes on after it fires" if args.no_early_stop else ""))

    def fired():  # (a finished run that is extended keeps its fallback choice in the state too)
        return run.state.get("decision", {}).get("fired", False)

    def on_epoch(row):
        run.history.append(row)
        if not fired():
            decision = recipe.choose(run.history, rule, set(run.keeper.kept) | {row["epoch"]})
            if decision["fired"]:
                run.state["decision"] = compact(decision)
                run.state["marks"] = {decision["chosen_epoch"]: "divergence.pth"}
                say(decision["reason"])
        decided = {run.state["decision"]["chosen_epoch"]} if fired() else set()
        run.keep(row, recipe.still_needed(run.history, rule) | decided)
        run.state["stopped_early"] = fired() and not args.no_early_stop
        return run.state["stopped_early"]

    run.fit(on_epoch)
    return end_stage1(run, rule, out, stage_dir)


def compact(decision):
    return {k: v for k, v in decision.items() if k != "tests"}


def end_stage1(run, rule, out, stage_dir):
    history, available = run.history, set(run.keeper.kept)
    fired = run.state.get("decision", {}).get("fired", False)
    decision = run.state["decision"] if fired else compact(recipe.choose(history, rule, available))
    chosen = decision["chosen_epoch"]
    best = recipe.steady_best(history, rule.window // 2, available)
    run.state.update(decision=decision, marks={chosen: "divergence.pth", **({best: "best.pth"} if best != chosen else {})})
    if not decision["fired"]:
        say(decision["reason"])
    row = next(r for r in history if r["epoch"] == chosen)
    warnings = []
    if recipe.near_chance(row["val_acc"], row["val_n"], len(run.data["classes"])):
        warnings.append(f"the kept epoch's val_acc {row['val_acc']:.1f} % is within noise of chance "
                        f"({100 / len(run.data['classes']):.1f} %): the model has not learnt much")
        say(f"warning: {warnings[-1]}", file=sys.stderr)
    if run.main:
        write_divergence_json(stage_dir / "divergence.json", history, rule, decision, warnings, out / "divergence.pth")
    say(f"kept epoch {chosen} (val {row['val_acc']:.2f} %, gap {row['gap']:.2f}) as {out / 'divergence.pth'}; "
        f"steady best-val epoch {best} as {stage_dir / 'best.pth'}")
    return run.finish({out / "divergence.pth": chosen, stage_dir / "best.pth": best})


def write_divergence_json(path, history, rule, decision, warnings, checkpoint_path):
    upto = [r for r in history if r["epoch"] <= decision.get("fired_at", history[-1]["epoch"])]
    tests = recipe.divergence(upto, rule)["tests"]
    good, sv = recipe.qualifying(history, rule.window // 2)
    epochs = [{"epoch": r["epoch"], "train_acc": r["train_acc"], "val_acc": r["val_acc"], "gap": r["gap"],
               "val_se": round(recipe.se_points(r["val_acc"], r["val_n"]), 3), "smoothed_val": round(v, 3),
               "gap_se": round(recipe.gap_se(r), 3)} for r, v in zip(history, sv)]
    files.write_json(path, {**decision, "checkpoint": str(checkpoint_path), "warnings": warnings,
                            "rule": recipe.rule_dict(rule), "epochs_within_one_se_of_best_val": good,
                            "epochs": epochs, "tests": tests})


# ---------------------------------------------------------------- stage 2

def stage2(args):
    """Fine-tune from --init at lr 1e-7 and keep the last (or steady best) epoch as final.pth."""
    args.init = args.init or str(Path(args.out) / "divergence.pth")
    stat = Path(args.init).stat() if Path(args.init).is_file() else None
    args.init_id = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None  # a retrained --init is a new run
    out, stage_dir = prepare_out(args, "1e-7")
    prev = previous_run(args, stage_dir)
    if finished(prev, args, stage_dir):
        restore_named(out / "final.pth", stage_dir, prev["stage"]["final_epoch"])
        return cli.EXIT_OK
    init = None if prev else checkpoint.load(args.init)
    run = open_stage(args, stage_dir, f"stage 2: lr {args.lr:g} from {Path(args.init).name}", prev, init)

    def on_epoch(row):
        run.history.append(row)
        run.keep(row, {recipe.steady_best(run.history)})
        return False

    run.fit(on_epoch, eval_first=True)
    history = run.history
    last, best = history[-1]["epoch"], recipe.steady_best(history, available=set(run.keeper.kept))
    final = last if args.keep == "last" else best
    run.state.update(final_epoch=final, marks={final: "final.pth"})
    rows = {r["epoch"]: r for r in history}
    say(f"\n{'':22}{'val_acc':>9}{'gap':>9}")
    for label, epoch in (("start (ep 0)", 0), (f"last (ep {last})", last), (f"steady best (ep {best})", best)):
        say(f"{label:22}{rows[epoch]['val_acc']:9.2f}{rows[epoch]['gap']:9.2f}")
    say(f"final.pth: {out / 'final.pth'} = epoch {final} ({args.keep}, --keep); epoch 0 is the --init checkpoint")
    return run.finish({out / "final.pth": final})

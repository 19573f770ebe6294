"""The two training stages of the recipe: their shared flags, settings, start, resume, epochs and end.

Stage 1 (lr 1e-4) keeps the epoch its rule chooses (smalldata/rule.py; --rule) as divergence.pth;
stage 2 (lr 1e-7) starts there and keeps its last epoch (or, with --keep best, its steady best) as final.pth.
One epoch reads top to bottom in train_epochs: train, measure, observe, keep, save, report.
"""
import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from . import IMAGENET_MEAN, IMAGENET_STD, cache, checkpoint, cli, files, plots, rule as rules, runtime
from .cli import UsageError, say
from .data import AUGMENTATIONS, DEVICE_SHARE, Augment, load_training_data
from .folders import refuse_overlap
from .keeper import Keeper
from .model import build_model, check_input, count_parameters, imagenet_available
from .train import (average_spec, make_loop, measure, metric_columns, restore_training_state, train_epoch,
                    training_state)

# Settings that define a run: a rerun with other values must not silently continue the old one. The
# rule is not among them: it only reads the history, so a resumed run may be decided by other flags.
RUN_DEFINING = ("data", "arch", "lr", "batch_size", "img_size", "weights", "init", "init_id", "seed", "no_br",
                "no_ocm", "weight_decay", "deterministic", "no_precise_bn", "augment", "measure_averages")
STAGE_FILES = ("last.pth", "best.pth", "swa.pth", "metrics.csv", "watch.csv", "val_losses.csv", "train_losses.csv",
               "curves.png", "divergence.json", "args.json")


def add_training_args(p, lr, epochs):
    """The flags both training scripts share."""
    p.add_argument("--data", type=cli.existing_dir, default="data",
                   help="folder with train/ and val/, and optionally br/ and ocm/")
    p.add_argument("--out", type=cli.output_dir, default="checkpoints", help="where checkpoints, metrics and plots go")
    p.add_argument("--lr", type=cli.positive_float, default=lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.0, help="Adam weight decay (our default)")
    p.add_argument("--epochs", type=cli.positive_int, default=epochs, help="most epochs to train")
    p.add_argument("--batch-size", type=cli.positive_int, default=32,
                   help="images per step (the global batch: under torchrun each of N workers takes batch / N); a "
                        "last, smaller batch of an epoch is left out. With N GPUs raise it with N (e.g. 32 per "
                        "GPU), or each GPU gets a few images and the gradients' all-reduce dominates the step; "
                        "with a larger batch raise --lr too (a common rule: with the batch for SGD, with its "
                        "square root for Adam; not measured here)")
    p.add_argument("--augment", choices=list(AUGMENTATIONS), default="full",
                   help="augmentation of the training batches: full (crop 35-100 %%, flip, rotate +-15 degrees, "
                        "colour +-20 %%), light (crop 70-100 %%, flip) or none")
    p.add_argument("--measure-averages", nargs="+", type=average_spec, default=[], metavar="AVG",
                   help="for comparison: also measure weight averages every epoch (emaT: exponential moving "
                        "average with a time constant of T epochs; swa: mean of the last quarter's epochs) "
                        "as <AVG>_val_acc, ... in metrics.csv; no decision reads them")
    p.add_argument("--no-br", action="store_true", help="leave data/br out of the training set")
    p.add_argument("--no-ocm", action="store_true", help="leave data/ocm out of the training set")
    p.add_argument("--watch", type=cli.existing_dir,
                   help="labelled folder (usually data/test) scored every epoch as watch_acc in metrics.csv, "
                        "for analysis only: no decision reads it")
    p.add_argument("--cache-dir", type=cli.output_dir,
                   help="where the decoded photos are kept (default: <--out>/cache): each data folder's photos "
                        "decoded once per image size, rebuilt when a file changes; outside the data folders")
    p.add_argument("--no-cache", action="store_true", help="decode every photo; read and write no decode cache")
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


# ---------------------------------------------------------------- settings, resolved once

@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A stage's settings, resolved once from the arguments (and, on a resume, from the run's own), then
    read everywhere; never changed afterwards. Field names are the flags'."""
    stage: str  # "1e-4" or "1e-7"
    data: Path
    out: Path
    arch: str
    img_size: int
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    seed: int
    augment: str
    no_br: bool
    no_ocm: bool
    watch: Path | None
    no_cache: bool
    cache_dir: Path | None
    data_on: str
    no_precise_bn: bool
    keep_all: bool
    deterministic: bool
    compile: bool
    sync_bn: bool
    device: str
    measure_averages: tuple
    resume: Path | None
    fresh: bool
    rule: rules.Rule  # what the stage keeps, and whether it stops early
    rule_flags: dict  # the flags that made `rule` (written to args.json under their own names)
    divergence: rules.Divergence | None = None  # stage 1: the recipe's rule, reported beside another --rule
    weights: str | None = None  # stage 1: imagenet, none or PATH
    init: Path | None = None  # stage 2: the checkpoint it starts from
    init_id: str | None = None  # stage 2: size and mtime of --init, so a retrained --init is a new run
    keep: str | None = None  # stage 2: last or best

    @property
    def dir(self):
        return Path(self.out) / self.stage

    def to_json(self):
        skip = ("rule", "rule_flags", "divergence")
        return checkpoint.json_args({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                        if f.name not in skip}, **self.rule_flags})


def resolve(args, stage, prev=None, init=None):
    """The StageConfig of `args`; on a resume, the run-defining settings of the run being continued
    (a rule flag that differs is said in one line and applies from here: the rule only reads the history)."""
    rule_flags = {k: getattr(args, k) for k in rules.RULE_FLAGS if hasattr(args, k)}
    if stage == "1e-4":
        rule, divergence = rules.from_args(rule_flags), rules.from_settings("divergence", rule_flags)
    else:  # stage 2: the recipe's "ep20" keeps the last epoch; --keep best the steady best
        rule, divergence = rules.SteadyBest() if args.keep == "best" else rules.LastEpoch(), None
    fixed = ("stage", "rule", "rule_flags", "divergence")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StageConfig)
              if f.name not in fixed and hasattr(args, f.name)}
    values["measure_averages"] = tuple(values.get("measure_averages") or ())
    for k in ("data", "out", "watch", "init", "resume"):  # absolute: a checkpoint says where its data were
        if values.get(k) is not None:
            values[k] = Path(values[k]).resolve()
    values["cache_dir"] = Path(values.get("cache_dir") or Path(values["out"]) / "cache").resolve()
    if init is not None:  # stage 2: the model and its input come from the checkpoint
        values.update(arch=init["arch"], img_size=init["img_size"])
    if prev is not None:
        old = prev["args"]
        for k in RUN_DEFINING:
            if k in old and k in values:
                values[k] = tuple(old[k]) if isinstance(values[k], tuple) else type_like(values[k], old[k])
        values.update(arch=prev["arch"], img_size=prev["img_size"])
        changed = [f"--{k.replace('_', '-')} {old[k]} -> {vars(args)[k]}" for k in rules.RULE_FLAGS
                   if k in old and k in vars(args) and str(old[k]) != str(vars(args)[k])]
        if changed:
            say(f"note: the rule's flags differ from the resumed run's ({', '.join(changed)}); the new ones decide "
                "from here, replayed over the whole history")
    return StageConfig(stage=stage, rule=rule, rule_flags=rule_flags, divergence=divergence,
                       **{k: values.get(k) for k in (f.name for f in dataclasses.fields(StageConfig)) if k not in fixed})


def type_like(current, old):
    """A setting read back from a run's args.json (JSON types) as the type of the parsed flag."""
    if old is None or current is None or isinstance(current, bool):
        return old
    return type(current)(old) if not isinstance(current, Path) else Path(old)


# ---------------------------------------------------------------- start and resume

def prepare_out(args, stage_name):
    """The stage folder, after refusing an --out inside --data and clearing a killed run's temporaries."""
    out = Path(args.out)
    refuse_overlap(out, args.data, "--out", "--data", "the next run would read the checkpoints folder as a "
                   "class; choose an --out outside the data", both_ways=False)
    if args.cache_dir:
        refuse_overlap(args.cache_dir, args.data, "--cache-dir", "--data", "the decode cache would be read as "
                       "photos; choose a folder outside the data", both_ways=False)
    if runtime.is_main():
        files.remove_stale_temps(out)
    cli.log_to(out / stage_name)
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
    differ = [k for k in RUN_DEFINING if k in old and hasattr(args, k) and _flat(k, old[k]) != _flat(k, vars(args)[k])]
    if differ and not args.resume:
        raise UsageError(f"{stage_dir} holds a run made with other arguments ("
                         + ", ".join(f"{k}: {old[k]} -> {_flat(k, vars(args)[k])}" for k in differ)
                         + "); pass --resume to continue it, or --fresh to start over (deletes its files)")
    return ckpt


def _flat(key, value):
    """A setting as args.json writes it, for comparing with a run's own: lists of strings, and paths
    absolute (a run records them so; the same folder named relatively is the same folder)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if key in ("data", "init", "weights") and value is not None and str(value) not in ("imagenet", "none"):
        return str(Path(value).resolve())
    return str(value) if value is not None else None


def finished(ckpt, args, stage_dir):
    done = ckpt is not None and ckpt.get("finished") and not args.resume and (
        ckpt["stage"].get("stopped_early") or ckpt["epoch"] >= args.epochs)
    if done:
        say(f"{stage_dir}: already finished (epoch {ckpt['epoch']}); nothing to do. Use --fresh to train again.")
    return done


def restore_named(target, stage_dir, epoch, weights_file=None):
    """A finished stage whose named checkpoint is gone (deleted, or lost to a kill): link it again, from
    its epoch's file, or from `weights_file` when it held averaged weights."""
    if Path(target).exists() or not runtime.is_main():
        return
    source = Path(stage_dir) / (weights_file or f"epochs/epoch_{epoch:03d}.pth")
    if not source.exists():
        raise UsageError(f"{target} is missing and the weights of its epoch ({epoch}) are no longer kept; "
                         "rerun with --fresh")
    files.link_or_copy(source, target)
    say(f"{target} was missing; written again from {source} (epoch {epoch})")


def starting_checkpoint(cfg):
    """The checkpoint --weights FILE names, opened (safely) and checked before any photo is decoded."""
    if cfg.weights in ("none", "imagenet"):
        return None
    ckpt = checkpoint.load(cfg.weights)
    if ckpt["arch"] != cfg.arch:
        raise UsageError(f"{cfg.weights} is a {ckpt['arch']} checkpoint, not {cfg.arch}; pass --arch {ckpt['arch']}")
    return ckpt


def initial_model(cfg, classes, ckpt):
    """Stage 1's starting model and a note for the banner: ImageNet, none, or one of our checkpoints
    (`ckpt`, from starting_checkpoint)."""
    if cfg.weights == "none":
        return build_model(cfg.arch, len(classes)), "from scratch (--weights none)"
    if cfg.weights == "imagenet":
        note = "ImageNet weights" + ("" if imagenet_available(cfg.arch) else " (downloading)")
        return build_model(cfg.arch, len(classes), "imagenet"), note
    model = build_model(cfg.arch, len(classes))
    state = ckpt["model"]
    if ckpt["classes"] != list(classes):  # other classes: keep the body, start a fresh head
        head = {k for k, v in model.state_dict().items() if k in state and v.shape != state[k].shape}
        state = {k: v for k, v in state.items() if k not in head}
        checkpoint.load_weights(model, state, cfg.weights, cfg.arch, strict=False)
        return model, f"body of {cfg.weights} (other classes: new head)"
    checkpoint.load_weights(model, state, cfg.weights, cfg.arch)
    return model, f"weights of {cfg.weights} (epoch {ckpt['epoch']})"


# ---------------------------------------------------------------- one stage's run

class StageRun:
    """The glue of one stage: the loop (train.py), its files (keeper.py), its rule and its history."""

    def __init__(self, cfg, title, model, data, meta, prev, runtime_, problems):
        self.cfg, self.dir, self.title, self.data, self.problems = cfg, cfg.dir, title, data, problems
        device, amp = runtime_
        self.loop = make_loop(model, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device, amp=amp,
                              mean=meta["mean"], std=meta["std"], batch_size=cfg.batch_size, seed=cfg.seed,
                              compile=cfg.compile, precise_bn=not cfg.no_precise_bn, sync_bn=cfg.sync_bn,
                              augment=Augment(**AUGMENTATIONS[cfg.augment]), averages=cfg.measure_averages)
        self.main = runtime.is_main()  # under torchrun only rank 0 writes files
        self.keeper = Keeper(self.dir, {**meta, "args": cfg.to_json()}, cfg.keep_all, writes=self.main)
        self.history, self.state, self.first_epoch = [], {}, 1
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            files.write_json(self.dir / "args.json", cfg.to_json())
        if prev:
            restore_training_state(self.loop, prev)
            self.keeper.restore(prev)
            self.history, self.state = list(prev["history"]), dict(prev["stage"])
            self.first_epoch = prev["epoch"] + 1
            say(f"resuming after epoch {prev['epoch']} ({len(self.history)} epochs of history)"
                + ("" if prev.get("optimizer") else "; a finished stage keeps no Adam state, so Adam starts afresh"))

    def banner(self, weights_note, meta):
        c, classes = self.cfg, meta["classes"]
        say(f"== {self.title}")
        say(f"{runtime.describe(self.loop.device, self.loop.amp)}, compile {'on' if c.compile else 'off'}")
        say(f"classes ({len(classes)}): {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}")
        say("images: " + ", ".join(f"{k} {v}" for k, v in self.data["counts"].items()) + f" at {meta['img_size']} px")
        say("decoded images: " + ", ".join(f"{k} {v}" for k, v in self.data["how"].items())
            + ("" if c.no_cache else f" (decode cache {c.cache_dir}: once per image size, rebuilt when a file changes)"))
        others = None if c.no_cache else cache.describe_others(c.cache_dir, c.img_size)
        if others:
            say(others)
        say(f"data: {self.data['where']}")
        say(f"model {meta['arch']} {count_parameters(self.loop.model):,} parameters; {weights_note}; Adam lr "
            f"{c.lr:g}, weight decay {c.weight_decay:g}, batch {c.batch_size}, epochs {self.first_epoch}..{c.epochs}")
        say("BatchNorm statistics: " + ("running averages (--no-precise-bn)" if c.no_precise_bn else
                                        "exact, of the training originals, recomputed before each evaluation"))
        say(f"augmentation: {c.augment} (--augment)" + (f"; weight averages measured for comparison: "
                                                          f"{', '.join(c.measure_averages)}" if c.measure_averages else ""))
        if c.watch:
            say(f"watch: {c.watch} is scored every epoch (watch_acc in metrics.csv) for analysis only; "
                "no decision reads it")
        say(f"outputs in {self.dir} (resolved arguments: {self.dir / 'args.json'})")

    def training_state(self, optimizer):
        return training_state(self.loop, self.history, self.state, optimizer)

    def write_progress(self):
        if not self.main:
            return
        rows, writer = list(self.history), self.keeper.writer
        columns = metric_columns(self.loop.averages)
        writer.submit("metrics", files.write_csv, self.dir / "metrics.csv", columns,
                      [[r.get(c, "") for c in columns] for r in rows])
        if self.cfg.watch:  # which watched photos each epoch got right, in file order: paired comparisons
            bits = ["watch_correct"] + [f"{a}_watch_correct" for a in self.loop.averages]
            writer.submit("watch", files.write_csv, self.dir / "watch.csv", ["epoch"] + bits,
                          [[r["epoch"]] + [r.get(c, "") for c in bits] for r in rows])
        for split in ("val", "train"):  # each photo's loss every epoch: changes between epochs judged paired
            names = self.data["names"]["orig" if split == "train" else split]
            writer.submit(f"{split}_losses", files.write_csv, self.dir / f"{split}_losses.csv",
                          ["epoch", "correct", *names],
                          [[r["epoch"], r[f"{split}_correct"], *r[f"{split}_losses"]] for r in rows
                           if f"{split}_losses" in r])
        writer.submit("curves", plots.elsewhere, plots.training_curves, rows, self.dir / "curves.png", self.title,
                      dict(self.state.get("marks", {})), getattr(self.cfg.rule, "window", 5))

    def finish(self, named):
        """last.pth (finished), then the named checkpoints {path: (epoch, the decision that named it,
        averaged weights or None)}."""
        self.keeper.writer.flush()  # the last periodic last.pth lands whole before the final one replaces it
        epochs = {epoch for epoch, _, _ in named.values()}
        self.keeper.kept = {e: v for e, v in self.keeper.kept.items() if e in epochs}
        last = self.history[-1]["epoch"]
        self.keeper.save_last(last, self.training_state, finished=True)
        for path, (epoch, decision, averaged) in named.items():
            self.keeper.name(path, epoch, {"file": Path(path).name, "stage": self.cfg.stage, **decision}, averaged)
        self.write_progress()
        self.keeper.close()
        plots.stop_helper()
        runtime.teardown()
        say(f"metrics: {self.dir / 'metrics.csv'}   curves: {self.dir / 'curves.png'}   log: {self.dir / 'log.txt'}")
        self.problems.summary(self.dir if self.main else None)
        return self.problems.exit_code()


def train_epochs(run, eval_first=False):
    """The stage's epochs; each reads top to bottom: train, measure, observe, keep, save, report.
    With eval_first (stage 2), the starting weights are measured first, as epoch 0. Returns the last decision."""
    loop, data, cfg, decision = run.loop, run.data, run.cfg, None
    if eval_first and run.first_epoch == 1:
        run.history.append(measure(loop, data, 0, 0.0, (float("nan"), float("nan"), 0.0)))
        decision = cfg.rule.observe(run.history)
        run.keeper.snapshot(loop.model, run.history[-1], rules.held(run.history, decision))
    for epoch in range(run.first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        aug = train_epoch(loop, *data["train"], desc=f"epoch {epoch}/{cfg.epochs}")  # train
        for average in loop.averages.values():
            average.after_epoch(loop.model, epoch)
        row = measure(loop, data, epoch, time.perf_counter() - t0, aug)  # measure
        run.history.append(row)
        decision = cfg.rule.observe(run.history, set(run.keeper.kept) | {epoch})  # observe
        run.keeper.snapshot(loop.model, row, rules.held(run.history, decision))  # keep
        run.state.update(decision=compact(decision), stopped_early=decision.stop,
                         marks={decision.chosen: "kept"} if decision.stop else {})
        run.write_progress()
        run.keeper.save_last(epoch, run.training_state)  # save
        say(f"epoch {epoch:3d}  train {row['train_acc']:6.2f}%  val {row['val_acc']:6.2f}%  gap {row['gap']:6.2f}  "
            f"val_loss {row['val_loss']:.4f}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s")  # report
        if decision.stop:
            say(decision.reason)
            break
    return decision if decision is not None else cfg.rule.observe(run.history, set(run.keeper.kept))


def compact(decision):
    """A decision as the stage's state keeps it (JSON; the tests are in divergence.json)."""
    evidence = {k: v for k, v in decision.evidence.items() if k != "tests"}
    return {"stop": decision.stop, "chosen_epoch": decision.chosen, "reason": decision.reason, **evidence}


def open_stage(cfg, title, prev, init=None, start=None):
    """Decode the data and build the StageRun; `init` is the checkpoint stage 2 starts from, `start` the
    one stage 1's --weights FILE names."""
    problems = cli.Problems()
    device_amp = runtime.setup(cfg.device, cfg.seed, cfg.deterministic)
    workers = runtime.world()[1]
    if cfg.batch_size % workers:
        raise UsageError(f"--batch-size {cfg.batch_size} is the global batch; it must divide among the "
                         f"{workers} torchrun workers (try {cfg.batch_size - cfg.batch_size % workers or workers})")
    if cfg.sync_bn and (workers == 1 or device_amp[0].type != "cuda"):
        raise UsageError("--sync-bn is for torchrun runs on GPUs (PyTorch's SyncBatchNorm has no CPU version)")
    source = prev or init
    with runtime.main_first():  # rank 0 writes the decode cache, the other workers read it
        data = load_training_data(cfg.data, cfg.img_size, problems, source and source["classes"], not cfg.no_br,
                                  not cfg.no_ocm, cfg.watch, None if cfg.no_cache else cfg.cache_dir, device_amp[0],
                                  cfg.data_on)
    if source:
        model = checkpoint.build_from(source, cfg.resume or cfg.dir / "last.pth" if prev else cfg.init)
        meta = {k: source[k] for k in ("arch", "classes", "img_size", "mean", "std")}
        note = "resumed" if prev else f"weights of {cfg.init} (epoch {init['epoch']}), fresh Adam"
    else:
        model, note = initial_model(cfg, data["classes"], start)
        meta = dict(arch=cfg.arch, classes=data["classes"], img_size=cfg.img_size, mean=list(IMAGENET_MEAN),
                    std=list(IMAGENET_STD))
    run = StageRun(cfg, title, model, data, meta, prev, device_amp, problems)
    run.banner(note, meta)
    return run


# ---------------------------------------------------------------- stage 1

def stage1(args):
    """Train at lr 1e-4 and keep the epoch the rule chooses as divergence.pth; returns the exit code."""
    if args.rule == "swa" and "swa" not in args.measure_averages:  # the rule keeps that average: track it
        args = argparse.Namespace(**{**vars(args), "measure_averages": [*args.measure_averages, "swa"]})
    out, stage_dir = prepare_out(args, "1e-4")
    prev = previous_run(args, stage_dir)
    if finished(prev, args, stage_dir):
        restore_named(out / "divergence.pth", stage_dir, prev["stage"]["decision"]["chosen_epoch"],
                      prev["stage"].get("weights_file"))
        return cli.EXIT_OK
    cfg = resolve(args, "1e-4", prev)
    problem = None if prev else check_input(cfg.arch, cfg.img_size)  # before any photo is decoded
    if problem:
        raise UsageError(problem)
    start = None if prev else starting_checkpoint(cfg)  # (a refused file stops the run before decoding)
    run = open_stage(cfg, f"stage 1: {cfg.arch} lr {cfg.lr:g}", prev, start=start)
    del start  # (its weights are in the model now)
    say(f"rule: {describe_rule(cfg.rule)} (details: divergence.json)")
    decision = train_epochs(run)
    return end_stage1(run, decision, out, stage_dir)


def describe_rule(rule):
    if isinstance(rule, rules.Divergence):
        return (f"divergence: from epoch {rule.min_epochs}, over {rule.window}-epoch windows, the gap must widen "
                f"beyond {rule.z:g} standard errors for {rule.patience} epochs in a row"
                + ("" if rule.early_stop else "; --no-early-stop: training goes on after it fires"))
    return f"{rule.name}: {rule.text}"


def end_stage1(run, decision, out, stage_dir):
    history, cfg = run.history, run.cfg
    chosen = decision.chosen
    best = rules.steady_best(history, 2, set(run.keeper.kept))
    swa = isinstance(cfg.rule, rules.WeightAverage)
    first = run.loop.averages["swa"].averaged_epochs()[0] if swa else None
    would = None if isinstance(cfg.rule, rules.Divergence) else cfg.divergence.observe(history)
    marks = {**({would.chosen: "divergence rule would keep"} if would and would.evidence["fired"] else {}),
             **({best: "best.pth"} if best != chosen else {}), **({first: "SWA from"} if swa else {}),
             chosen: "divergence.pth"}
    run.state.update(decision=compact(decision), marks=marks)
    if not decision.stop:
        say(decision.reason)
    if would:
        say(f"(the recipe's divergence rule, replayed on this history: {would.reason})")
    row = next(r for r in history if r["epoch"] == chosen)
    kept, kept_val = (f"the SWA mean of epochs {first}-{chosen}", row.get("swa_val_acc", row["val_acc"])) if swa \
        else (f"epoch {chosen}", row["val_acc"])
    warnings = []
    if rules.near_chance(kept_val, row["val_n"], len(run.data["classes"])):
        warnings.append(f"the kept weights' val_acc {kept_val:.1f} % is within noise of chance "
                        f"({100 / len(run.data['classes']):.1f} %): the model has not learnt much")
        say(f"warning: {warnings[-1]}", file=sys.stderr)
    if run.main:
        write_divergence_json(stage_dir / "divergence.json", history, cfg, decision, warnings, out / "divergence.pth",
                              would)
    say(f"kept {kept} (val {kept_val:.2f} %) as {out / 'divergence.pth'}; "
        f"steady best-val epoch {best} as {stage_dir / 'best.pth'}")
    steady = {"rule": "steady-best", "chosen_epoch": best, "reason": rules.SteadyBest().observe(history).reason}
    averaged = None
    if swa:  # the mean of the last quarter's weights, not one epoch's
        averaged = {"state": run.loop.averages["swa"].model.state_dict(), "file": "swa.pth",
                    "weights": f"SWA: the mean of the weights at the end of epochs {first}-{chosen}, BatchNorm "
                               "statistics recomputed for the mean",
                    "metrics": {**{k: row[k] for k in ("epoch", "train_n", "val_n") if k in row},
                                **{k[4:]: v for k, v in row.items() if k.startswith("swa_") and not k.endswith("_correct")}}}
        run.state["weights_file"] = "swa.pth"
    return run.finish({out / "divergence.pth": (chosen, {"rule": cfg.rule.name, **compact(decision)}, averaged),
                       stage_dir / "best.pth": (best, steady, None)})


def write_divergence_json(path, history, cfg, decision, warnings, checkpoint_path, would=None):
    """Why divergence.pth holds its epoch: the rule, its reason and numbers, every epoch's noise, and, when
    another rule chose, what the recipe's divergence rule would have done on the same history."""
    good, sv = rules.qualifying(history, 2)
    epochs = [{"epoch": r["epoch"], "train_acc": r["train_acc"], "val_acc": r["val_acc"], "gap": r["gap"],
               "val_se": round(rules.se_points(r["val_acc"], r["val_n"]), 3), "smoothed_val": round(v, 3),
               "gap_se": round(rules.gap_se(r), 3), "val_loss": r["val_loss"], "val_loss_se": r.get("val_loss_se")}
              for r, v in zip(history, sv)]
    body = {"chosen_epoch": decision.chosen, "reason": decision.reason, "stopped_early": decision.stop,
            "checkpoint": str(checkpoint_path), "warnings": warnings, "rule": cfg.rule.settings(),
            **{k: v for k, v in decision.evidence.items() if k != "tests"}}
    if would is not None:  # another rule chose: what the divergence rule would have done
        body["divergence_rule_would"] = rules.outcome(would)
        decision = would
    files.write_json(path, {**body, "epochs_within_one_se_of_best_val": good, "epochs": epochs,
                            "tests": decision.evidence.get("tests", [])})


# ---------------------------------------------------------------- stage 2

def stage2(args):
    """Fine-tune from --init at lr 1e-7 and keep the last (or steady best) epoch as final.pth."""
    args.init = args.init or Path(args.out) / "divergence.pth"
    stat = Path(args.init).stat() if Path(args.init).is_file() else None
    args.init_id = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None  # a retrained --init is a new run
    out, stage_dir = prepare_out(args, "1e-7")
    prev = previous_run(args, stage_dir)
    if finished(prev, args, stage_dir):
        restore_named(out / "final.pth", stage_dir, prev["stage"]["final_epoch"])
        return cli.EXIT_OK
    init = None if prev else checkpoint.load(args.init)
    cfg = resolve(args, "1e-7", prev, init)
    run = open_stage(cfg, f"stage 2: lr {cfg.lr:g} from {Path(cfg.init).name}", prev, init)
    decision = train_epochs(run, eval_first=True)
    history = run.history
    last, best = history[-1]["epoch"], rules.steady_best(history, available=set(run.keeper.kept))
    final = decision.chosen
    run.state.update(final_epoch=final, marks={final: "final.pth"})
    rows = {r["epoch"]: r for r in history}
    say(f"\n{'':22}{'val_acc':>9}{'gap':>9}")
    for label, epoch in (("start (ep 0)", 0), (f"last (ep {last})", last), (f"steady best (ep {best})", best)):
        say(f"{label:22}{rows[epoch]['val_acc']:9.2f}{rows[epoch]['gap']:9.2f}")
    say(f"final.pth: {out / 'final.pth'} = epoch {final} ({cfg.keep}, --keep); epoch 0 is the --init checkpoint")
    return run.finish({out / "final.pth": (final, {"rule": cfg.rule.name, **compact(decision)}, None)})

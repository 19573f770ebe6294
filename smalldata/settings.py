"""A training stage's settings: its flags in groups (data, model, optimiser, rule, candidates,
checkpoints, hardware), read once into frozen objects, one per group, held by a StageSpec.

Parse, build the spec (stage1_spec, stage2_spec), resolve it against the run it continues or the
checkpoint it starts from (resolve), then compare what defines the run with the stored run's
(differences). Nothing here, or anywhere, writes to the parsed arguments.
"""
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from . import augment, checkpoint, cli, images, layout, rule as rules
from .averages import EMA, SWA
from .data import DEVICE_SHARE
from .layout import RunPaths

# Settings that define a run: a rerun with other values must not silently continue the old one. The
# rule is not among them: it only reads the history, so a resumed run may be decided by other flags.
RUN_DEFINING = ("data", "arch", "lr", "batch_size", "img_size", "weights", "init", "init_id", "seed", "no_br",
                "no_ocm", "weight_decay", "deterministic", "no_precise_bn", "augment", "augment_ops", "swa_epochs",
                "ema_epochs")


@dataclass(frozen=True)
class Data:
    data: Path
    watch: Path | None = None
    no_br: bool = False
    no_ocm: bool = False
    cache_dir: Path | None = None
    no_cache: bool = False
    data_on: str = "auto"
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    allow_missing_val_classes: bool = False


@dataclass(frozen=True)
class Model:
    arch: str | None = None  # stage 2: from its --init checkpoint
    img_size: int | None = None
    weights: str | None = None  # stage 1 starts from: imagenet, none, or a checkpoint of ours
    init: Path | None = None  # stage 2 starts from this checkpoint (its model, classes and input)
    init_id: str | None = None  # size and mtime of --init: a retrained --init is a new run


@dataclass(frozen=True)
class Optimiser:
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int = 32
    augment: str = "full"
    seed: int = 0
    no_precise_bn: bool = False


@dataclass(frozen=True)
class Candidates:
    swa_epochs: int = 0  # 0: no SWA
    ema_epochs: float = 0.0  # 0: no EMA
    candidates_each_epoch: bool = False


@dataclass(frozen=True)
class Checkpoints:
    out: Path
    keep_all: bool = False
    resume: Path | None = None
    fresh: bool = False


@dataclass(frozen=True)
class Hardware:
    device: str = "auto"
    compile: bool = False
    sync_bn: bool = False
    deterministic: bool = False


GROUPS = ("data", "model", "optim", "candidates", "checkpoints", "hardware")  # a StageSpec's settings groups


@dataclass(frozen=True)
class StageSpec:
    """One training stage: where it starts, how it trains, what rule decides, what it writes."""
    stage: str  # its folder's name: stage1, stage2
    title: str
    data: Data
    model: Model
    optim: Optimiser
    rule: rules.Rule
    checkpoints: Checkpoints
    hardware: Hardware
    candidates: Candidates = Candidates()
    # The named checkpoints (layout.RunPaths.output) and what each holds: "rule" the rule's chosen epoch,
    # "steady" the steady best-val epoch, or a weight average by name (averages.py).
    outputs: tuple = ()
    replayed: tuple = ()  # rules whose decision on the same history is reported beside the rule's, not acted on
    measure_start: bool = False  # measure the starting weights as epoch 0

    @property
    def groups(self):
        return tuple(getattr(self, name) for name in GROUPS)

    def paths(self):
        return RunPaths.of(self.checkpoints.out, self.stage)

    def to_json(self):
        """args.json: every setting by its flag's name (JSON types), the rule's flags, the augmentation's operations."""
        values = {"stage": self.stage, **{f.name: getattr(g, f.name) for g in self.groups for f in fields(g)},
                  **rules.flag_values(self.rule), "augment_ops": augment.definition(self.optim.augment)}
        return checkpoint.json_args(values)

    def run_defining(self):
        """The settings that define the run (those the stage sets: stage 2 takes its model from --init)."""
        return {k: v for k, v in self.to_json().items() if k in RUN_DEFINING and v is not None}


# ---------------------------------------------------------------- the flags, in groups

def add_training_args(p, lr, epochs):
    """The flags both training scripts share; returns the groups for each script's own flags."""
    g = {name: p.add_argument_group(name) for name in ("data", "model", "optimiser", "rule", "checkpoints",
                                                       "hardware")}
    add_data_args(g["data"])
    add_optimiser_args(g["optimiser"], lr, epochs)
    add_checkpoint_args(g["checkpoints"])
    h = g["hardware"]
    cli.add_device_arg(h)
    h.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first epoch)")
    h.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm) "
                        "instead of each worker's share")
    h.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms: CPU runs repeat bit for bit anyway; on a GPU cuBLAS and "
                        "cuDNN repeat too, but a few kernels have no deterministic version and only warn")
    return g


def add_data_args(g):
    g.add_argument("--data", type=cli.existing_dir, default="data",
                   help="folder with train/ and val/, and optionally br/ and ocm/")
    g.add_argument("--watch", type=cli.existing_dir,
                   help="labelled folder (usually data/test) scored every epoch as watch_acc in "
                        "metrics.csv, for analysis only: no decision reads it")
    g.add_argument("--no-br", action="store_true", help="leave data/br out of the training set")
    g.add_argument("--no-ocm", action="store_true", help="leave data/ocm out of the training set")
    g.add_argument("--cache-dir", type=cli.output_dir,
                   help="where the decoded photos are kept (default: <--out>/cache): each data folder's "
                        "photos decoded once per image size, rebuilt when a file changes")
    g.add_argument("--no-cache", action="store_true", help="decode every photo; no decode cache")
    g.add_argument("--data-on", choices=["auto", "device", "stream"], default="auto",
                   help="device: the whole decoded set in the training device's memory, batches cut "
                        "there; stream: batches read from the memory-mapped decode cache a few ahead; "
                        f"auto: device when the set takes under {100 * DEVICE_SHARE:.0f}%% of the free memory")
    images.add_max_pixels_arg(g)
    g.add_argument("--allow-missing-val-classes", action="store_true",
                   help="train although data/val has no photo of some class (validation then measures the "
                        "others only, and the run names the classes it lacks)")


def add_optimiser_args(o, lr, epochs):
    o.add_argument("--lr", type=cli.positive_float, default=lr, help="Adam learning rate")
    o.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.0, help="Adam weight decay (our default)")
    o.add_argument("--epochs", type=cli.positive_int, default=epochs, help="most epochs to train")
    o.add_argument("--batch-size", type=cli.positive_int, default=32,
                   help="images per step (the global batch: under torchrun each of N workers takes batch / N); a "
                        "last, smaller batch of an epoch is left out. With N GPUs raise it with N (e.g. 32 per "
                        "GPU); with a larger batch raise --lr too (a common rule: with the square root of the "
                        "batch for Adam; not measured here)")
    o.add_argument("--augment", choices=list(augment.PRESETS), default="full",
                   help="augmentation of the training batches: " + "; ".join(
                       f"{name}: {augment.describe(name)}" for name in augment.PRESETS))
    o.add_argument("--seed", type=cli.nonnegative_int, default=0)
    o.add_argument("--no-precise-bn", action="store_true",
                   help="measure with BatchNorm's running averages instead of statistics recomputed on the "
                        "training originals before each evaluation (for comparison only)")


def add_checkpoint_args(c):
    c.add_argument("--out", type=cli.output_dir, default="checkpoints", help="where checkpoints, metrics and plots go")
    c.add_argument("--keep-all", action="store_true",
                   help="write every epoch's weights to <stage>/epochs/ (about 0.5 GB each for VGG-13)")
    c.add_argument("--resume", type=cli.existing_file,
                   help="continue from this last.pth exactly (epochs, optimizer, RNG, history)")
    c.add_argument("--fresh", action="store_true", help="delete this stage's earlier run and start over")


def add_candidate_args(p):
    g = p.add_argument_group("candidates", "weights kept beside the rule's choice, each saved and scored")
    g.add_argument("--swa-epochs", type=cli.nonnegative_int, default=5,
                   help="swa.pth: the mean of the weights at the end of the last N epochs the stage trained "
                        "(0: none)")
    g.add_argument("--ema-epochs", type=cli.nonnegative_float, default=4.0,
                   help="ema.pth: an exponential moving average of the weights after every step, with a time "
                        "constant of N epochs (0: none)")
    g.add_argument("--candidates-each-epoch", action="store_true",
                   help="score the candidates every epoch (columns swa_val_acc, ema_val_acc... in metrics.csv), "
                        "not only at the end (each costs about one evaluation of val and the originals)")


# ---------------------------------------------------------------- the spec of each stage

def group(cls, args, **values):
    """A settings group from the parsed flags of its fields (absolute paths), and `values`."""
    raw = vars(args)
    out = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
    out.update(values)
    for k, v in out.items():
        if isinstance(v, Path) or k in ("data", "out", "watch", "init", "resume", "cache_dir") and v is not None:
            out[k] = Path(v).resolve()
    return cls(**out)


def common(args):
    out = Path(args.out).resolve()
    return dict(data=group(Data, args, cache_dir=Path(args.cache_dir or layout.cache_dir(out)).resolve()),
                optim=group(Optimiser, args), checkpoints=group(Checkpoints, args), hardware=group(Hardware, args))


def stage1_spec(args):
    """Stage 1: train at --lr (1e-4) from --weights; divergence.pth holds the rule's epoch, swa.pth and
    ema.pth the averages, <stage>/best.pth the steady best-val epoch."""
    rule = rules.from_args(args)
    replayed = () if rule.name == rules.DEFAULT else (rules.from_args(args, rules.DEFAULT),)
    return StageSpec(stage="stage1", title=f"stage 1: {args.arch} lr {args.lr:g}", model=group(Model, args), rule=rule,
                     candidates=group(Candidates, args), replayed=replayed,
                     outputs=((layout.DIVERGENCE, "rule"), (layout.BEST, "steady"), (SWA.name, SWA.name),
                              (EMA.name, EMA.name)),
                     **common(args))


def stage2_spec(args):
    """Stage 2: fine-tune from --init (default <out>/divergence.pth) at --lr (1e-7); final.pth holds the
    rule's epoch (the last, or with --keep best the steady best). The starting weights are epoch 0."""
    init = Path(args.init or RunPaths.of(args.out, "stage1").output(layout.DIVERGENCE)).resolve()
    stat = init.stat() if init.is_file() else None
    model = Model(init=init, init_id=f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None)
    return StageSpec(stage="stage2", title=f"stage 2: lr {args.lr:g} from {init.name}", model=model,
                     rule=rules.keep_rule(args), outputs=((layout.FINAL, "rule"),), measure_start=True, **common(args))


# ---------------------------------------------------------------- resolved against a stored run

def resolve(spec, stored=None, start=None):
    """The spec, resolved: on a resume, the run-defining settings of the run it continues (its model and
    input size too); for stage 2, the model and input size of the checkpoint it starts from."""
    if stored is not None:
        old = stored["args"]
        spec = replace(spec, {k: old[k] for k in RUN_DEFINING if k in old})
        return replace(spec, {"arch": stored["arch"], "img_size": stored["img_size"]})
    if start is not None and spec.model.init is not None:
        return replace(spec, {"arch": start["arch"], "img_size": start["img_size"]})
    return spec


def replace(spec, values):
    """The spec with some settings (by flag name) replaced, each read as the type of the setting it replaces."""
    new = {name: dataclasses.replace(g, **{f.name: like(getattr(g, f.name), values[f.name]) for f in fields(g)
                                           if f.name in values})
           for name, g in zip(GROUPS, spec.groups)}
    return dataclasses.replace(spec, **new)


def like(current, old):
    """A setting read back from a run's args.json (JSON types) as the type of the parsed flag."""
    if old is None or current is None or isinstance(current, bool):
        return old
    return Path(old) if isinstance(current, Path) else type(current)(old)


def differences(spec, stored_args):
    """'setting: stored -> now' for each run-defining setting the stored run had otherwise."""
    now = spec.run_defining()
    return [f"{k}: {stored_args[k]} -> {now[k]}" for k in RUN_DEFINING
            if k in stored_args and k in now and flat(k, stored_args[k]) != flat(k, now[k])]


def rule_changes(spec, stored_args):
    now = rules.flag_values(spec.rule)
    return [f"{k}: {stored_args[k]} -> {v}" for k, v in now.items() if k in stored_args and str(stored_args[k]) != str(v)]


def flat(key, value):
    """A setting as args.json writes it, for comparing with a run's own: lists of strings, and paths
    absolute (a run records them so; the same folder named relatively is the same folder)."""
    if isinstance(value, (list, tuple)):
        return [flat(key, v) if isinstance(v, (list, tuple, dict)) else str(v) for v in value]
    if isinstance(value, dict):
        return {k: flat(k, v) for k, v in value.items()}
    if key in ("data", "init", "weights") and value is not None and str(value) not in ("imagenet", "none"):
        return str(Path(value).resolve())
    return str(value) if value is not None else None

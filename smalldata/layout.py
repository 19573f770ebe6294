"""Where a training run's files go: the one place their names are written.

    <out>/divergence.pth, swa.pth, ema.pth   stage 1's named checkpoints (what stage 2 and people start from)
    <out>/final.pth                          stage 2's
    <out>/<stage>/                           a stage's folder: stage1, stage2 (older versions: 1e-4, 1e-7)
        last.pth, args.json, metrics.csv, val_losses.csv, train_losses.csv, watch.csv, curves.png,
        <output>.json (why the output holds its weights), best.pth, swa.pth, ema.pth, epochs/epoch_NNN.pth
    <out>/cache/                             the decode cache (cache.py)
"""
from dataclasses import dataclass
from pathlib import Path

# The named checkpoints: what stage 1 keeps (stage 2 starts there), stage 1's steady best, stage 2's result.
DIVERGENCE, BEST, FINAL = "divergence", "best", "final"
# Versions before this one named a stage's folder after its learning rate.
OLD_FOLDERS = {"stage1": "1e-4", "stage2": "1e-7"}


def cache_dir(out):
    return Path(out) / "cache"


@dataclass(frozen=True)
class RunPaths:
    out: Path
    stage: str
    dir: Path  # the stage's folder
    old: bool = False  # the folder an older version made, continued under its old name

    @classmethod
    def of(cls, out, stage):
        """The stage's folder in `out`: <out>/<stage>, or the older version's folder when only that holds a run."""
        out = Path(out)
        new, old = cls(out, stage, out / stage), cls(out, stage, out / OLD_FOLDERS.get(stage, stage), old=True)
        return old if stage in OLD_FOLDERS and not new.last.exists() and old.last.exists() else new

    # -- in the stage's folder
    @property
    def last(self):
        return self.dir / "last.pth"

    @property
    def args(self):
        return self.dir / "args.json"

    @property
    def metrics(self):
        return self.dir / "metrics.csv"

    @property
    def watch(self):
        return self.dir / "watch.csv"

    def losses(self, split):
        """Each photo's loss every epoch, for paired comparisons: split val or train (the originals)."""
        return self.dir / f"{split}_losses.csv"

    @property
    def curves(self):
        return self.dir / "curves.png"

    def decision(self, output):
        """Why `output` holds its weights: the rule, its evidence every epoch, the candidates."""
        return self.dir / f"{output}.json"

    @property
    def epochs(self):
        return self.dir / "epochs"

    def epoch(self, n):
        return self.epochs / f"epoch_{n:03d}.pth"

    def own(self, name):
        """The stage's own file of an output that is no epoch's (a weight average): what its name links to."""
        return self.dir / f"{name}.pth"

    # -- the named checkpoints
    def output(self, name):
        """A named checkpoint: beside the stage folders, where the next stage and people look; the steady
        best, for comparison only, inside."""
        return self.dir / f"{name}.pth" if name == BEST else self.out / f"{name}.pth"

    @property
    def cache(self):
        return cache_dir(self.out)

    def stage_files(self):
        """The files of a stage's run (deleted by --fresh, with the epochs folder)."""
        fixed = [self.last, self.args, self.metrics, self.watch, self.losses("val"), self.losses("train"),
                 self.curves]
        return fixed + sorted(self.dir.glob("*.pth")) + sorted(self.dir.glob("*.json"))

"""Every file a training stage keeps, written on one background thread so that training never waits for the disk.

The Keeper holds copies of the weights of the epochs a decision may still pick (and of those a weight
average is made of), writes the named checkpoints (divergence.pth, best.pth, swa.pth, final.pth...),
and writes last.pth for --resume together with the epoch files that last.pth needs, then prunes the rest.
A kill at any moment leaves a last.pth whose epoch files are all on disk. (timm's
CheckpointSaver is the model for this split between the loop and its files.)
"""
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import checkpoint, files

# last.pth (weights + Adam state, 1.5 GB for VGG-13) is written at most this often, and always at the
# end: an epoch of the recipe on a GPU is estimated at seconds (not yet measured), and writing the
# optimizer state every epoch could cost more than the epoch. A crash loses at most this much training.
LAST_EVERY_S = 20.0


class Writer:
    """One background thread, jobs in order. A job not yet started is replaced by a newer one with the
    same key (only the newest metrics.csv or curves.png matters); an error is raised at the next call."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self.jobs = {}

    def submit(self, key, fn, *args):
        self.raise_errors()
        old = self.jobs.get(key)
        if old is not None:
            old.cancel()
        self.jobs[key] = self.pool.submit(fn, *args)

    def busy(self, key):
        return key in self.jobs and not self.jobs[key].done()

    def raise_errors(self):
        for key, job in list(self.jobs.items()):
            if job.done():
                del self.jobs[key]
                if not job.cancelled() and job.exception() is not None:
                    raise job.exception()

    def flush(self):
        for job in list(self.jobs.values()):
            if not job.cancelled():
                job.exception()  # waits
        self.raise_errors()

    def close(self):
        self.flush()
        self.pool.shutdown()


def device_room(model):
    """True when 20 copies of the model's weights fit in a quarter of its GPU's free memory."""
    first = next(iter(model.parameters()), None)
    if first is None or not first.is_cuda:
        return False
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 20 * size < 0.25 * torch.cuda.mem_get_info(first.device)[0]


def summary(row):
    """An epoch's metrics as its checkpoint carries them: the summary numbers, not the per-photo lists."""
    return {k: v for k, v in row.items() if not k.endswith(("_losses", "_correct"))}


class Keeper:
    """The files go where `paths` (layout.RunPaths) says. `writes=False` (torchrun workers other than
    rank 0): the same epochs held, so that every worker takes the same decisions and can measure a weight
    average made of them (SWA), but no files written."""

    def __init__(self, paths, meta, keep_all=False, writes=True):
        self.paths, self.meta, self.keep_all, self.writes = paths, meta, keep_all, writes
        self.writer = Writer()
        self.kept = {}  # epoch -> (weights, metrics row) of the epochs a decision may still pick
        self.last_saved_at = -LAST_EVERY_S  # the first epoch is saved
        self.last_epoch = None  # the epoch of the newest last.pth submitted (written once close() returns)
        self.on_device = None  # keep the copies on the GPU (decided at the first snapshot, see snapshot)

    def make(self, epoch, state=None, **extra):
        state, row = (state, {}) if state is not None else self.kept[epoch]
        return checkpoint.make(state, epoch=epoch, metrics=row, **self.meta, **extra)

    def snapshot(self, model, row, needed):
        """Keep a copy of this epoch's weights; forget epochs no decision can pick any more. On a GPU with
        room for 20 copies (a quarter of the free memory), the copies stay on the GPU: a device copy
        takes a fraction of a millisecond where a host copy of 0.5 GB stalls training; files are moved to
        the host by the writer thread."""
        if self.on_device is None:
            self.on_device = device_room(model)
        self.kept[row["epoch"]] = (checkpoint.model_state(model, self.on_device), summary(row))
        for epoch in [e for e in self.kept if e not in needed | {row["epoch"]}]:
            del self.kept[epoch]
        if self.keep_all and self.writes:
            # (made now: by the time the writer gets to it, a rule may no longer need this epoch's weights)
            self.writer.submit(f"epoch {row['epoch']}", checkpoint.save, self.make(row["epoch"]),
                               self.paths.epoch(row["epoch"]))

    def weights(self, epoch, model):
        """{epoch: weights} of the held epochs, and `model`'s weights as `epoch` when it is not held yet."""
        out = {e: w for e, (w, _) in self.kept.items()}
        if epoch not in out:
            out[epoch] = model.state_dict()
        return out

    def name(self, path, epoch, decision, averaged=None):
        """Write the kept weights of `epoch` as `path` (best.pth, divergence.pth, final.pth), with the
        decision that named it, so that the file explains why it holds that epoch. `averaged` (a dict of
        state, metrics, weights and own: the stage's own file) names averaged weights instead."""
        if not self.writes:
            return
        if averaged is not None:
            ckpt = checkpoint.make(checkpoint.snapshot(averaged["state"]), epoch=epoch, metrics=averaged["metrics"],
                                   **{**self.meta, "weights": averaged["weights"]}, decision=decision)
            self.writer.submit(str(path), self._write_named, Path(path), averaged["own"], ckpt)
            return
        if epoch not in self.kept:
            raise checkpoint.CheckpointError(
                f"the weights of epoch {epoch} are no longer kept (an interrupted run lost them); rerun with --fresh")
        self.writer.submit(str(path), self._write_named, Path(path), self.paths.epoch(epoch),
                           self.make(epoch, decision=decision))

    def save_last(self, epoch, state_of, finished=False):
        """last.pth (weights, optimizer, RNG, history) and the epoch files it needs, at most every
        LAST_EVERY_S seconds unless `finished`; skipped, rather than queued, while the disk is behind.
        `state_of(optimizer)` gives train.training_state, asked for only when a save is due: the host
        copy of Adam's state (1 GB for VGG-13) is made only then, and the weights are this epoch's
        snapshot, not copied again. A finished stage's last.pth leaves the optimizer state out: 1 GB
        less per stage, and only extending a finished run with more --epochs would use it (Adam then
        starts afresh)."""
        due = time.monotonic() - self.last_saved_at >= LAST_EVERY_S
        if not self.writes or not finished and (not due or self.writer.busy("last")):
            return
        self.last_saved_at = time.monotonic()
        training_state = state_of(not finished)
        model = training_state.pop("model")
        state = self.kept[epoch][0] if epoch in self.kept else checkpoint.model_state(model, bool(self.on_device))
        ckpt = self.make(epoch, state, kept_epochs=sorted(self.kept), finished=finished, **training_state)
        # (the newest epoch's weights are in last.pth itself; a finished run also gets its file, for the named links)
        epochs = {e: self.make(e) for e in self.kept if (e != epoch or finished) and not self.paths.epoch(e).exists()}
        self.writer.submit("last", self._write_last, ckpt, epochs)
        self.last_epoch = epoch

    def restore(self, ckpt):
        """Continue after the epoch of a last.pth: reload the kept epochs it lists, and delete epoch
        files a killed run wrote past it."""
        folder, self.last_epoch = self.paths.epochs, ckpt["epoch"]
        for path in sorted(folder.glob("epoch_*.pth")) if folder.is_dir() and self.writes else []:
            if int(path.stem.split("_")[1]) > ckpt["epoch"]:
                path.unlink()
        rows = {r["epoch"]: summary(r) for r in ckpt["history"]}
        for epoch in ckpt.get("kept_epochs", []):
            if epoch == ckpt["epoch"]:
                self.kept[epoch] = (ckpt["model"], rows.get(epoch, {}))
            elif self.paths.epoch(epoch).exists():
                self.kept[epoch] = (checkpoint.load(self.paths.epoch(epoch))["model"], rows.get(epoch, {}))

    def close(self):
        self.writer.close()

    # -- on the writer thread
    def _write_named(self, path, source, ckpt):
        # The source (the epoch's file, or the averaged weights' own) is written with the decision, then
        # linked: one file on disk for both names (the source is what restores a deleted name). A second
        # name for the same epoch replaces the source, not the first name's file, which keeps its decision.
        checkpoint.save(ckpt, source)
        files.link_or_copy(source, path)

    def _write_last(self, ckpt, epochs):
        for epoch, epoch_ckpt in epochs.items():
            checkpoint.save(epoch_ckpt, self.paths.epoch(epoch))
        checkpoint.save(ckpt, self.paths.last)
        if not self.keep_all:  # only now may the files the previous last.pth needed go
            needed = set(ckpt["kept_epochs"])
            for path in self.paths.epochs.glob("epoch_*.pth"):
                if int(path.stem.split("_")[1]) not in needed:
                    path.unlink(missing_ok=True)

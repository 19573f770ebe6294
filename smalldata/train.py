"""The training loop both stages share: data in memory, one epoch, evaluation, bookkeeping.

model_1e-4.py and model_1e-7_ep20.py differ only in how they start (fresh model vs a
chosen checkpoint) and which epoch they keep (the divergence rule vs the best epoch);
everything else (data, augmentation, AMP, metrics.csv, curves.png, last.pth, resume) is here.
"""
import contextlib
import math
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import IMAGENET_MEAN, IMAGENET_STD, checkpoint, files, plots
from .cli import Problems, UsageError, resolve_device, say
from .data import Augment, batch_order, load_images, normalize
from .folders import check_same_classes, empty_classes, find_classes, scan_labelled
from .model import build_model, count_parameters

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "gap", "seconds",
                  "aug_loss", "aug_acc", "images_per_s"]
# Arguments that define a run: a rerun with other values must not silently continue the old one.
RUN_DEFINING = ("data", "arch", "lr", "batch_size", "img_size", "weights", "init", "init_id", "seed", "no_br",
                "no_ocm", "weight_decay", "gap_jump", "gap_window", "patience", "deterministic")
# last.pth (weights + Adam state, 1.5 GB for VGG-13) is written at most this often during a run, and
# always at its end: on a GPU an epoch takes about a second, and copying the optimizer state out
# every epoch would cost more than the epoch. A crash loses at most this much training.
LAST_EVERY_S = 20.0


# ---------------------------------------------------------------- runtime and data

def setup_runtime(args):
    """Device, seeds and the fast-math switches; returns (device, amp dtype or None)."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = None
    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, amp


def load_data(args, img_size, problems, classes=None):
    """Decode data/train (+ br, ocm) and data/val into memory; returns a dict of tensors and counts."""
    root = Path(args.data)
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise UsageError(f"{train_dir} not found: put your photos in {train_dir}/<class>/<image>")
    if not val_dir.is_dir():
        raise UsageError(f"{val_dir} not found: model selection needs a labelled validation folder "
                         f"{val_dir}/<class>/<image>")
    train_classes = find_classes(train_dir)
    if classes is not None and list(classes) != train_classes:
        raise UsageError(f"the checkpoint's classes {list(classes)} differ from {train_dir}'s "
                         f"{train_classes}; start from a checkpoint made on this data")
    originals, classes = scan_labelled(train_dir)
    empty = empty_classes(originals, classes)
    if empty:
        raise UsageError(f"class folder(s) with no images in {train_dir}: {', '.join(empty)}")
    sources = {"train": originals}
    for name, skip in (("br", args.no_br), ("ocm", args.no_ocm)):
        folder = root / name
        if skip or not folder.is_dir():
            continue
        check_same_classes(classes, folder, name)
        sources[name] = scan_labelled(folder, classes)[0]
    val_samples, _ = scan_labelled(val_dir, classes)
    if not val_samples:
        raise UsageError(f"{val_dir} holds no images")

    out = {"classes": classes, "counts": {}}
    decoded = {}
    for name, samples in {**sources, "val": val_samples}.items():
        x, y, _ = load_images(samples, img_size, problems, desc=f"decode {name}")
        decoded[name] = (x, y)
        out["counts"][name] = len(y)
    out["orig"] = decoded["train"]
    out["val"] = decoded["val"]
    out["train"] = (torch.cat([decoded[n][0] for n in sources]), torch.cat([decoded[n][1] for n in sources]))
    if not len(out["val"][1]) or not len(out["orig"][1]):
        raise UsageError("no decodable images left in data/train or data/val (see the skipped files above)")
    return out


# ---------------------------------------------------------------- one epoch

def amp_context(device, amp):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def train_epoch(model, optimizer, scaler, data, args, device, amp, generator, mean, std, desc):
    """One pass over the training tensor with augmentation; returns (loss, acc %, images/s)."""
    model.train()
    x_all, y_all = data
    augment = Augment()
    batches = [b for b in batch_order(len(y_all), args.batch_size, generator) if len(b) > 1]  # BN needs 2+
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = shown = time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stdout)
    for idx in bar:
        idx = idx.to(device, non_blocking=True)
        x = normalize(augment(x_all[idx], generator), mean, std)
        y = y_all[idx]
        with amp_context(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        # Accumulate on the device: no host sync per step, only for the bar's numbers twice a second.
        loss_sum += loss.detach().float() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
        if time.perf_counter() - shown > 0.5:
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100.0 * correct.item() / seen:.1f}%",
                            refresh=False)
    loss, acc = loss_sum.item() / seen, 100.0 * correct.item() / seen  # one sync per epoch
    return loss, acc, seen / (time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model, data, batch_size, device, amp, mean, std):
    """Loss and accuracy (%) in eval mode without augmentation."""
    model.eval()
    x_all, y_all = data
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for idx in batch_order(len(y_all), batch_size, shuffle=False):
        idx = idx.to(device, non_blocking=True)
        x, y = normalize(x_all[idx], mean, std), y_all[idx]
        with amp_context(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(y_all), 100.0 * correct.item() / len(y_all)


# ---------------------------------------------------------------- choosing an epoch

def find_divergence(rows, window, jump):
    """The divergence rule: the first epoch t where the gap (train_acc - val_acc, points) grew by
    more than `jump` over the last `window` epochs while val_acc did not improve on epoch t-window.
    Returns None, or a dict whose `chosen_epoch` (t - window) is where the widening began."""
    for i in range(window, len(rows)):
        start, end = rows[i - window], rows[i]
        growth = end["gap"] - start["gap"]
        best_val = max(r["val_acc"] for r in rows[i - window + 1:i + 1])
        if growth > jump and best_val <= start["val_acc"]:
            return {"fired_at_epoch": end["epoch"], "chosen_epoch": start["epoch"],
                    "gap_growth": round(growth, 4), "gap_at_chosen": start["gap"], "gap_at_fire": end["gap"],
                    "val_acc_at_chosen": start["val_acc"], "best_val_acc_in_window": best_val}
    return None


def best_epoch(rows):
    """Highest val_acc; ties go to the smaller gap, then the earlier epoch."""
    return min(rows, key=lambda r: (-r["val_acc"], r["gap"], r["epoch"]))["epoch"]


# ---------------------------------------------------------------- the run

class Run:
    """State of one training stage: model, optimizer, data, history and the files it keeps."""

    def __init__(self, args, stage_dir, title, keep_recent=0):
        self.args, self.dir, self.title = args, Path(stage_dir), title
        self.arch = None
        self.keep_all = getattr(args, "keep_all", False)
        self.problems = Problems()
        self.device, self.amp = setup_runtime(args)
        self.writer = checkpoint.BackgroundWriter()
        self.history = []
        # (epoch, CPU weights) of the last `keep_recent` epochs, in memory and on disk
        self.recent = deque(maxlen=max(1, keep_recent))
        self.keep_recent = keep_recent
        self.generator = torch.Generator().manual_seed(args.seed)
        self.extra_state = {}  # stage-specific state saved in last.pth (e.g. the divergence result)
        self.start_epoch = 1
        self.last_saved_at = -LAST_EVERY_S  # the first epoch is saved
        self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)

    # -- setup
    def build(self, model, arch, classes, img_size, data, mean=None, std=None):
        self.arch, self.classes, self.img_size = arch, classes, img_size
        if mean is not None:
            self.mean, self.std = list(mean), list(std)
        model = model.to(self.device)
        if self.device.type == "cuda":  # cuDNN's fastest convolutions want NHWC; on CPU it is no faster
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # fused: one kernel for all parameters instead of a loop over 30+ tensors
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.args.lr,
                                          weight_decay=self.args.weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.data = {k: self._to_device(v) for k, v in data.items() if k in ("train", "orig", "val")}
        self.counts = data["counts"]
        self.step_model = torch.compile(model) if self.args.compile else model

    def _to_device(self, xy):
        x, y = xy
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def banner(self, weights_note):
        a = self.args
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        say(f"== {self.title}")
        say(f"device {self.device} ({dev}), AMP {str(self.amp).replace('torch.', '') if self.amp else 'off'}, "
            f"{'channels_last, ' if self.device.type == 'cuda' else ''}compile {'on' if a.compile else 'off'}")
        say(f"classes ({len(self.classes)}): {', '.join(self.classes[:20])}{' ...' if len(self.classes) > 20 else ''}")
        say("images: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()) + f" at {self.img_size} px")
        say(f"model {self.arch} {count_parameters(self.model):,} parameters; "
            f"{weights_note}; Adam lr {a.lr:g}, weight decay {a.weight_decay:g}, batch {a.batch_size}, "
            f"epochs {self.start_epoch}..{a.epochs}")
        say(f"outputs in {self.dir}")

    # -- checkpoints
    def meta(self, epoch, row):
        return dict(arch=self.arch, classes=self.classes, img_size=self.img_size, mean=self.mean, std=self.std,
                    epoch=epoch, metrics=row or {}, args=self.args)

    def epoch_path(self, epoch):
        return self.dir / "epochs" / f"epoch_{epoch:03d}.pth"

    def save_weights(self, path, epoch, state, row):
        """Queue a weights-only contract checkpoint (no optimizer): what users open and stage 2 starts from."""
        ckpt = checkpoint.make(state, **self.meta(epoch, row))
        self.writer.submit(str(path), lambda: checkpoint.save(ckpt, path))

    def save_last(self, epoch, state=None, finished=False):
        """last.pth: weights + optimizer + RNG + history, for an exact --resume."""
        row = self.history[-1] if self.history else {}
        self.last_saved_at = time.monotonic()
        ckpt = checkpoint.make(state or checkpoint.model_state(self.model), **self.meta(epoch, row),
                               optimizer=_to_cpu(self.optimizer.state_dict()),
                               scaler=self.scaler.state_dict() if self.scaler else None,
                               rng={"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                               history=list(self.history), stage=dict(self.extra_state), finished=finished)
        path = self.dir / "last.pth"
        self.writer.submit("last", lambda: checkpoint.save(ckpt, path))

    def restore(self, ckpt):
        """Continue from a last.pth: optimizer, RNG, history and the recent epochs' weights."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.generator.set_state(ckpt["rng"]["generator"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.history = list(ckpt["history"])
        self.extra_state = dict(ckpt.get("stage") or {})
        self.start_epoch = ckpt["epoch"] + 1
        for row in self.history[-self.recent.maxlen:]:
            path = self.epoch_path(row["epoch"])
            if path.exists():
                self.recent.append((row["epoch"], checkpoint.load(path)["model"]))
        say(f"resuming after epoch {ckpt['epoch']} ({len(self.history)} epochs of history)")

    # -- the loop
    def fit(self, on_epoch, eval_first=False, on_end=None):
        """Train to args.epochs; on_epoch(row, state) runs after each epoch and returns True to stop.

        on_end() runs after the last epoch, before last.pth is marked finished: what it writes
        exists whenever a finished last.pth does.
        """
        self.dir.mkdir(parents=True, exist_ok=True)  # (stages.prepare_out has cleared old temporaries)
        if eval_first and not self.history:
            self.record(self.evaluate_row(0, 0.0, (math.nan, math.nan, 0.0)), on_epoch)
        for epoch in range(self.start_epoch, self.args.epochs + 1):
            t0 = time.perf_counter()
            aug = train_epoch(self.step_model, self.optimizer, self.scaler, self.data["train"], self.args,
                              self.device, self.amp, self.generator, self.mean, self.std,
                              desc=f"epoch {epoch}/{self.args.epochs}")
            row = self.evaluate_row(epoch, time.perf_counter() - t0, aug)
            stop, state = self.record(row, on_epoch)
            due = time.monotonic() - self.last_saved_at >= LAST_EVERY_S
            if due and not self.writer.pending("last"):  # skip, rather than queue, while the disk is behind
                self.save_last(epoch, state)
            if stop:
                break
        epoch = self.history[-1]["epoch"] if self.history else 0
        self.writer.flush()
        if on_end is not None:
            on_end()
        self.save_last(epoch, self.weights_of(epoch), finished=True)
        self.writer.close()
        return self.history

    def evaluate_row(self, epoch, train_seconds, aug):
        a = self.args
        bs = a.batch_size * 2
        train_loss, train_acc = evaluate(self.model, self.data["orig"], bs, self.device, self.amp, self.mean, self.std)
        val_loss, val_acc = evaluate(self.model, self.data["val"], bs, self.device, self.amp, self.mean, self.std)
        return {"epoch": epoch, "lr": a.lr, "train_loss": round(train_loss, 5), "train_acc": round(train_acc, 3),
                "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 3),
                "gap": round(train_acc - val_acc, 3), "seconds": round(train_seconds, 3),
                "aug_loss": round(aug[0], 5), "aug_acc": round(aug[1], 3), "images_per_s": round(aug[2], 1)}

    def record(self, row, on_epoch):
        self.history.append(row)
        state = checkpoint.model_state(self.model)
        self.recent.append((row["epoch"], state))
        say(f"epoch {row['epoch']:3d}  train {row['train_acc']:6.2f}%  val {row['val_acc']:6.2f}%  "
            f"gap {row['gap']:6.2f}  val_loss {row['val_loss']:.4f}  {row['seconds']:.1f}s  "
            f"{row['images_per_s']:.0f} img/s")
        # The recent epochs stay on disk (and in memory) so the divergence epoch still exists when the
        # rule fires a few epochs later.
        if row["epoch"] > 0 and (self.keep_recent or self.keep_all):
            self.save_weights(self.epoch_path(row["epoch"]), row["epoch"], state, row)
        self.prune_epoch_files()
        stop = on_epoch(row, state)
        rows = list(self.history)
        self.writer.submit("metrics", lambda: files.write_csv(
            self.dir / "metrics.csv", METRIC_COLUMNS, [[r[c] for c in METRIC_COLUMNS] for r in rows]))
        mark = self.extra_state.get("marked_epoch")
        label = self.extra_state.get("marked_label")
        self.writer.submit("curves", lambda: plots.training_curves(rows, self.dir / "curves.png", self.title,
                                                                   mark, label))
        return stop, state

    def prune_epoch_files(self):
        """Keep only the recent epochs' files on disk (all of them with --keep-all)."""
        if self.keep_all:
            return
        keep = {e for e, _ in self.recent}
        for row in self.history:
            if row["epoch"] not in keep and row["epoch"] > 0:
                path = self.epoch_path(row["epoch"])
                self.writer.submit(str(path), lambda p=path: p.unlink(missing_ok=True))

    def weights_of(self, epoch):
        for e, state in self.recent:
            if e == epoch:
                return state
        return None


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj

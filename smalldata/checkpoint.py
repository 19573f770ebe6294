"""The checkpoint format (a plain dict that torch.load(..., weights_only=True) opens) and
a background writer so that saving never stalls training.
"""
import pickle
import threading
import zipfile
from collections import OrderedDict

import torch

from . import files
from .cli import CheckpointError  # noqa: F401 (re-exported: raised by load and build_from)

REQUIRED = ("model", "arch", "classes", "img_size", "mean", "std", "epoch", "metrics", "args")


def model_state(model):
    """A CPU copy of the weights, with torch.compile's `_orig_mod.` prefix removed."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def make(state, *, arch, classes, img_size, mean, std, epoch, metrics, args, **extra):
    return {"model": state, "arch": arch, "classes": list(classes), "img_size": int(img_size),
            "mean": [float(x) for x in mean], "std": [float(x) for x in std], "epoch": int(epoch),
            "metrics": dict(metrics), "args": json_args(args), **extra}


def json_args(args):
    """The arguments as JSON types only (Paths become strings)."""
    items = vars(args).items() if hasattr(args, "__dict__") else dict(args).items()
    out = {}
    for k, v in items:
        if isinstance(v, (list, tuple)):
            v = [x if isinstance(x, (int, float, bool, str, type(None))) else str(x) for x in v]
        elif not isinstance(v, (int, float, bool, str, type(None))):
            v = str(v)
        out[k] = v
    return out


def save(ckpt, path):
    with files.atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load(path):
    """Open a checkpoint safely: weights_only=True, so a file carrying code is refused, not run."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused: it holds objects that a weights-only load does not allow "
                              f"(possibly code). Only open it with full trust in its source. ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (missing {', '.join(missing)})")
    return ckpt


def build_from(ckpt, path="checkpoint"):
    """The torchvision model a checkpoint describes, with its weights loaded."""
    from .model import build_model

    model = build_model(ckpt["arch"], len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['arch']} with "
                              f"{len(ckpt['classes'])} classes ({str(e).splitlines()[0]})") from None
    return model


class BackgroundWriter:
    """Runs file writes on one thread, in order, so the training loop never waits for the disk.

    Jobs carry a key; a job still waiting is replaced by a newer one with the same key
    (only the newest last.pth or curves.png matters). An error in a write is raised in the
    training thread at the next submit() or flush().
    """

    def __init__(self):
        self._jobs = OrderedDict()
        self._busy_key = None
        self._error = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, key, fn):
        with self._cv:
            self._raise_error()
            self._jobs.pop(key, None)
            self._jobs[key] = fn
            self._cv.notify()

    def pending(self, key):
        with self._cv:
            return key in self._jobs or self._busy_key == key

    def flush(self):
        with self._cv:
            while self._jobs or self._busy_key is not None:
                self._cv.wait()
            self._raise_error()

    def close(self):
        self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _raise_error(self):
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _run(self):
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if self._closed and not self._jobs:
                    return
                key, fn = self._jobs.popitem(last=False)
                self._busy_key = key
            try:
                fn()
            except BaseException as e:  # handed to the training thread
                with self._cv:
                    self._error = e
                    self._jobs.clear()
            finally:
                with self._cv:
                    self._busy_key = None
                    self._cv.notify_all()

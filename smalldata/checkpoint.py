"""The checkpoint format: a plain dict that torch.load(..., weights_only=True) opens, and
whose weights load into a plain torchvision model (docs/contract.md lists its keys)."""
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from . import files
from .cli import UsageError


class CheckpointError(UsageError):
    """A checkpoint that cannot or must not be used; the message says which file and why."""

REQUIRED = ("model", "arch", "classes", "img_size", "mean", "std", "epoch", "metrics", "args")


def model_state(model, on_device=False):
    """A copy of the weights, with torch.compile's `_orig_mod.` prefix removed: on the host, or with
    `on_device` a copy beside them on the GPU (a fraction of a millisecond, where a host copy of VGG-13's
    0.5 GB would stall training; save() moves it to the host on the writer thread)."""
    model = getattr(model, "_orig_mod", model)
    return snapshot(model.state_dict()) if on_device else to_host(model.state_dict())


def snapshot(obj):
    """A copy of a (nested) state where its tensors are: on the GPU a device copy (queued, no wait)."""
    return _map(obj, lambda t: t.detach().clone())


def _map(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def to_host(obj):
    """A host copy of a (nested) state. From a GPU every tensor is copied without blocking and the
    host waits once at the end, not once per tensor (76 tensors in VGG-13-BN, 150 in its Adam state)."""
    out = _map(obj, lambda o: o.detach().to("cpu", non_blocking=True) if o.is_cuda else o.detach().to("cpu", copy=True))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return out


def make(state, *, arch, classes, img_size, mean, std, epoch, metrics, args, **extra):
    """A checkpoint that explains itself: besides the weights, what it classifies, how a photo must be
    prepared for it, which epoch and numbers it is, the arguments and the versions that made it."""
    import torchvision

    from .images import PREPROCESSING

    return {"model": state, "arch": arch, "classes": list(classes), "img_size": int(img_size),
            "mean": [float(x) for x in mean], "std": [float(x) for x in std], "epoch": int(epoch),
            "metrics": {k: v for k, v in dict(metrics).items() if not k.endswith("_correct")},
            "args": json_args(args), "preprocessing": dict(PREPROCESSING),
            "weights": "the weights trained up to this epoch (no averaging)",
            "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                         "python": ".".join(map(str, sys.version_info[:3]))}, **extra}


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
    # Through a Python file: a full disk is then an OSError (ENOSPC) that says so, not torch's
    # "unexpected pos" RuntimeError from its own C++ writer; and the archive's inner folder is
    # always "archive", not the temporary's random name. Tensors still on a GPU are moved to the
    # host first (on the caller's thread: the keeper's writer), so every file loads on any machine.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        ckpt = _map(ckpt, lambda t: t.to("cpu") if t.is_cuda else t)
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:  # the zip writer, failing to finish after a failed write, hides its OSError
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


def load(path):
    """Open a checkpoint safely: weights_only=True, so a file carrying code is refused, not run."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {_refusal(e)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a torch file: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (missing {', '.join(missing)})")
    wrong = malformed(ckpt)
    if wrong:
        raise CheckpointError(f"{path}: not a usable checkpoint of this pipeline ({'; '.join(wrong)})")
    return ckpt


def malformed(ckpt):
    """What is wrong with the types of a checkpoint's fields (a foreign or hand-edited file), if anything."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    checks = {
        "model": isinstance(ckpt["model"], dict) and all(isinstance(k, str) and torch.is_tensor(v)
                                                         for k, v in ckpt["model"].items()),
        "arch": isinstance(ckpt["arch"], str),
        "classes": isinstance(ckpt["classes"], list) and len(ckpt["classes"]) > 0
                   and all(isinstance(c, str) for c in ckpt["classes"]),
        "img_size": isinstance(ckpt["img_size"], int) and not isinstance(ckpt["img_size"], bool)
                    and ckpt["img_size"] > 0,
        "mean": isinstance(ckpt["mean"], list) and len(ckpt["mean"]) == 3 and all(map(number, ckpt["mean"])),
        "std": isinstance(ckpt["std"], list) and len(ckpt["std"]) == 3
               and all(number(x) and x > 0 for x in ckpt["std"]),
        "epoch": isinstance(ckpt["epoch"], int) and not isinstance(ckpt["epoch"], bool),
        "metrics": isinstance(ckpt["metrics"], dict),
        "args": isinstance(ckpt["args"], dict),
    }
    return [f"{k} is not {WANTED[k]}" for k, ok in checks.items() if not ok]


WANTED = {"model": "a state_dict (names to tensors)", "arch": "a model name", "classes": "a list of class names",
          "img_size": "a positive int", "mean": "3 numbers", "std": "3 positive numbers", "epoch": "an int",
          "metrics": "a dict", "args": "a dict"}


def _refusal(e):
    """Why the weights-only loader stopped, in one line (torch's own message is a page about torch 2.6)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "unsupported" in ln.lower()), lines[0] if lines else "unsafe content")
    if "global" in detail.lower():
        return (f"refused: it asks to run or build Python objects ({detail}); a weights-only load never does. "
                "Only open it with full trust in its source")
    return f"refused: not a plain weights file ({detail}): damaged, random bytes, or a pickle of other objects"


def build_from(ckpt, path="checkpoint"):
    """The torchvision model a checkpoint describes, with its weights loaded."""
    from .model import build_model

    model = build_model(ckpt["arch"], len(ckpt["classes"]))
    load_weights(model, ckpt["model"], path, f"{ckpt['arch']} with {len(ckpt['classes'])} classes")
    return model


def load_weights(model, state, path, what, strict=True):
    """load_state_dict, with a mismatch reported as a CheckpointError naming the file."""
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: its weights do not fit {what} ({'; '.join(lines[:2])[:300]})") from None

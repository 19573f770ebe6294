"""The folder conventions: data/<split>/<class>/<image>, class order as ImageFolder sorts it."""
import os
import sys
from pathlib import Path

from . import files
from .cli import UsageError, say

SPLITS = ("train", "val", "test", "br", "ocm")
# Folders that must never feed BR and OCM: val and test must not leak into training.
HELD_OUT = ("val", "test")
# Files that operating systems drop into folders; ignored without a word.
JUNK_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}


def is_junk(path) -> bool:
    name = os.path.basename(path)
    return name.startswith(".") or name.lower() in JUNK_NAMES


def list_files(root):
    """All non-junk files below `root`, sorted, following folder links but never in a loop.

    Hidden files and folders are skipped (temporaries of the atomic writer among them). A link
    that leads nowhere (broken, or a loop) is listed too, so that the caller names it as
    unreadable instead of a photo going missing without a word; FIFOs and other non-files are not.
    """
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_junk(name):
                continue
            p = os.path.join(dirpath, name)  # (strings: pathlib costs more than the stat on 100k files)
            if os.path.isfile(p) or (os.path.islink(p) and not os.path.exists(p)):
                out.append(Path(p))
    return out


def find_classes(root):
    """Sub-folder names of `root`, sorted as torchvision.datasets.ImageFolder sorts them."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"folder not found: {root}")
    return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))


def scan_labelled(root, classes=None):
    """Return (samples, classes): samples are (path, class index) for every file in a class folder.

    With `classes` given, the folder's own classes must be among them (a validation folder
    may lack some; it may not have extra ones).
    """
    root = Path(root)
    own = find_classes(root)
    if classes is None:
        classes = own
        if not classes:
            raise UsageError(f"{root} has no class folders; expected {root}/<class>/<image>")
    else:
        unknown = sorted(set(own) - set(classes))
        if unknown:
            raise UsageError(f"{root} has classes that the training data lacks: {', '.join(unknown)}; "
                             f"known classes: {', '.join(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(p, index[c]) for c in own for p in list_files(root / c)]
    return samples, list(classes)


def empty_classes(samples, classes):
    """Class names with no files at all."""
    used = {i for _, i in samples}
    return [c for i, c in enumerate(classes) if i not in used]


def val_covers_classes(samples, classes, val_dir, allowed, which=""):
    """The classes with no validation photo among `samples` ((path, class index) pairs). Every choice made
    on validation would be made on the other classes only: refused, unless `allowed`; then said, and
    returned (the report names them)."""
    seen = {label for _, label in samples}
    missing = [c for i, c in enumerate(classes) if i not in seen]
    if missing and not allowed:
        raise UsageError(f"{val_dir} has no photos{which} of {len(missing)} class(es): {', '.join(missing)}; every "
                         f"choice made on validation would ignore them. Add photos of each class to {val_dir}, or "
                         "accept it with --allow-missing-val-classes")
    if missing:
        say(f"warning: {val_dir} has no photos{which} of {', '.join(missing)} (--allow-missing-val-classes): "
            f"validation measures the other {len(classes) - len(missing)} classes only", file=sys.stderr)
    return missing


def check_same_classes(train_classes, other_root, name):
    """data/br and data/ocm must hold exactly the classes of data/train."""
    other = find_classes(other_root)
    if other != list(train_classes):
        missing = sorted(set(train_classes) - set(other))
        extra = sorted(set(other) - set(train_classes))
        raise UsageError(
            f"{name} ({other_root}) does not hold the classes of the training folder: "
            f"missing {missing or 'none'}, extra {extra or 'none'}. Rebuild it from data/train "
            f"(or leave it out with --no-{name})")


def refuse_held_out(src):
    """Refuse a val/test folder as a source of synthetic training images (label leakage)."""
    tail = [p.lower() for p in Path(src).resolve().parts[-2:]]  # data/val or data/val/<class>
    hit = [h for h in HELD_OUT if h in tail]
    if hit:
        raise UsageError(f"{src} looks like a held-out split ({hit[0]}); building training images from "
                         "it would leak validation/test photos into training. Use data/train.")


def refuse_overlap(out, src, out_flag, src_flag, hint, both_ways=True):
    """Refuse an output folder inside an input folder (its files would be read as inputs), and with
    `both_ways` an input inside the output too."""
    out, src = Path(out).resolve(), Path(src).resolve()
    if files.is_inside(out, src) or (both_ways and files.is_inside(src, out)):
        raise UsageError(f"{out_flag} {out} and {src_flag} {src} overlap: {hint}")

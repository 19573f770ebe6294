"""The folder conventions: data/<split>/<class>/<image>, class order as ImageFolder sorts it."""
from pathlib import Path

from .cli import UsageError
from .images import list_files

SPLITS = ("train", "val", "test", "br", "ocm")
# The only folders that may feed BR and OCM; val and test must never leak into training.
HELD_OUT = ("val", "test")


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


def empty_classes(samples, classes, present=None):
    """Class names (of those present as folders) with no files at all."""
    counts = {c: 0 for c in (present if present is not None else classes)}
    for _, i in samples:
        counts[classes[i]] = counts.get(classes[i], 0) + 1
    return [c for c, n in counts.items() if n == 0]


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

"""Completion records: how a later step knows that data/br or data/ocm is finished, and made from the
photos and classes it trains on.

BR and OCM write <folder>/complete.json last, atomically, once every photo has been dealt with: what
was asked (the step's arguments), the classes, every source file (relative path, size, modification
time, content digest) and every file made. A step that starts changing its folder removes the record first, so a
folder without one is unfinished: interrupted, refused, or still being written. The training stages
read it (check) and refuse a folder that is missing, unfinished, made for other classes or from other
photos, or changed since, in one line that names the fix.

A file whose size and modification time are as recorded is taken as unchanged without reading it; one
whose time alone moved (a copy that did not keep times: cp -r, unzip, a download) is read, and is
unchanged when its content digest is as recorded. Records written before digests were kept compare
sizes and times only.
"""
import hashlib
import json
import os
from pathlib import Path

from . import files
from .folders import list_files

RECORD = "complete.json"
FORMAT = 1
# step -> (its script, the training flag that leaves its folder out, its flag for starting over)
STEPS = {"br": ("make_remove_background.py", "--no-br", "--fresh"),
         "ocm": ("make_cutmix.py", "--no-ocm", "--overwrite")}


def listing(root, paths, contents=True):
    """{path relative to root: [size, mtime in ns, content digest]} of each file (None for one that cannot
    be read); without `contents`, [size, mtime in ns] (what a check compares first, reading no file)."""
    return {Path(path).relative_to(root).as_posix(): stamp(path, contents) for path in paths}


def stamp(path, contents=False):
    """[size, mtime in ns] of a file, with its content digest after them with `contents`; None if unreadable."""
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns] + ([digest(path)] if contents else [])
    except OSError:
        return None


def digest(path):
    """A file's content digest (BLAKE2b, 128 bits), read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def class_files(folder, classes):
    return [p for c in classes for p in list_files(Path(folder) / c)]


def source_name(src, dst):
    """How the record names a source folder: relative to the data folder that holds `dst` (train, br), so
    the record stays valid when the whole data folder moves; else its absolute path."""
    src, data = Path(src).resolve(), Path(dst).resolve().parent
    return src.relative_to(data).as_posix() if files.is_inside(src, data) else str(src)


def clear(dst):
    """Before a step changes its folder: the folder is no longer a finished output."""
    (Path(dst) / RECORD).unlink(missing_ok=True)


def write(dst, step, asked, classes, sources, made, summary):
    """The record, written last: `sources` {source_name: listing}, `made` the listing of the files made,
    `summary` counts for a person reading it."""
    files.write_json(Path(dst) / RECORD, {"step": step, "format": FORMAT, "asked": asked, "classes": list(classes),
                                          "summary": summary, "sources": sources, "made": made})


def read(folder):
    try:
        record = json.loads((Path(folder) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def check(root, step, classes, originals):
    """None when root/<step> (br or ocm) is a finished output of its step, made for `classes` from the
    training photos `originals` ((path, label) pairs of root/train) and unchanged since; otherwise one
    line: what is wrong, and the fix."""
    script, leave_out, redo = STEPS[step]
    folder, train = Path(root) / step, Path(root) / "train"
    fix = f"rerun {script} ({redo} to make it all again), or train without it ({leave_out})"
    if not folder.is_dir():
        return f"{folder} not found: make it with {script}, or train without it ({leave_out})"
    record = read(folder)
    if record is None or record.get("step") != step:
        return (f"{folder} is unfinished: {script} has not completed it (no {RECORD}); rerun the same command to "
                f"finish it, or train without it ({leave_out})")
    if record["classes"] != list(classes):
        return f"{folder} was made for other classes ({', '.join(record['classes'])}) than {train} holds; {fix}"
    if "train" not in record["sources"]:
        return f"{folder} was made from {', '.join(record['sources'])}, not from {train}; {fix}"
    for name, old in record["sources"].items():
        src = Path(root, name)  # (an absolute name stays itself)
        base = train if name == "train" else src
        now = listing(train, [p for p, _ in originals], False) if name == "train" else \
            listing(src, class_files(src, classes), False)
        changed = differences(old, now, base)
        if changed:
            return f"{folder} was made from other photos than {src} holds now ({changed}); {fix}"
    own = [folder / name for name in record["made"] if "/" not in name]  # (OCM's manifest.csv)
    changed = differences(record["made"], listing(folder, class_files(folder, classes) + own, False), folder)
    if changed:
        return f"{folder} has changed since {script} completed it ({changed}); remove what it did not make and {fix}"
    return None


def made_from(dst, src):
    """A test (out, photo) -> whether dst's completion record lists `out` as made from `photo` (under src),
    both as they are now (unchanged): an output older than its photo is still up to date where the two
    only got new modification times (a copy that did not keep them). Always False without a record."""
    record = read(dst)
    made, photos = (record["made"], record["sources"].get(source_name(src, dst))) if record else ({}, None)

    def test(out, photo):
        if not photos:
            return False
        return (unchanged(photos.get(Path(photo).relative_to(src).as_posix()), stamp(photo), photo)
                and unchanged(made.get(Path(out).relative_to(dst).as_posix()), stamp(out), out))
    return test


def differences(old, new, root):
    """'2 added, 1 changed (e.g. cat/x.png)', or '' when the recorded listing `old` and the stat-only
    listing `new` of the files under root name the same files, unchanged (see unchanged)."""
    kinds = {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
             "changed": sorted(k for k in set(old) & set(new) if not unchanged(old[k], new[k], Path(root, k)))}
    found = [(kind, names) for kind, names in kinds.items() if names]
    if not found:
        return ""
    return ", ".join(f"{len(names)} {kind}" for kind, names in found) + f" (e.g. {found[0][1][0]})"


def unchanged(recorded, now, path):
    """Whether a file is as recorded: same size and time; or, where only its time moved and the record
    holds its digest, the same content."""
    if recorded is None or now is None or recorded[0] != now[0]:
        return False
    if recorded[1] == now[1]:
        return True
    try:
        return len(recorded) > 2 and digest(path) == recorded[2]
    except OSError:
        return False

"""Atomic file writing: every file the pipeline writes appears whole or not at all.

A writer gets a hidden temporary name in the destination folder (same file system, so
the final os.replace is atomic); the image listers skip hidden files, so a temporary
left by a killed run is never read as data, and `remove_stale_temps` clears them. The name
carries the host and the process id: on a file system shared between machines, only a
temporary of this host whose process is gone is stale.
"""
import contextlib
import csv
import io
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path


TEMP_MARK = ".tmp-"
HOST = socket.gethostname().replace("-", "_").replace(".", "_")  # ("-" separates the name's fields)
FOREIGN_STALE_S = 7 * 24 * 3600  # another host's temporary this old is surely not in flight


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data must be on disk before the name points at it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a write into an open file (a full disk) names no file: name the one we write
            e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_csv(path, header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def copy_file(src, dst):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def link_or_copy(src, dst):
    """Give the file `src` a second name `dst` (a hard link: no second copy on disk), atomically;
    where links are impossible (another file system, FAT), a copy."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def save_image(img, path, **save_kwargs):
    """Save a PIL image atomically; the format comes from the final name's suffix."""
    path = Path(path)
    buf = io.BytesIO()
    img.save(buf, format=_pil_format(path), **save_kwargs)
    write_bytes(path, buf.getvalue())


def _pil_format(path):
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def remove_stale_temps(folder):
    """Delete temporaries that a killed run left under `folder`; returns how many.

    A temporary of a process that is still running on this host is left alone: it may be another
    script writing into a shared folder right now. So is another host's, unless it is a week old:
    this host cannot know whether that process still runs.
    """
    count = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f".*{TEMP_MARK}*"):
        if p.is_file() and not _writer_alive(p):
            p.unlink(missing_ok=True)
            count += 1
    return count


def _writer_alive(path):
    fields = path.name.rsplit(TEMP_MARK, 1)[-1].split("-")
    host, pid = (fields[0], fields[1]) if len(fields) == 3 else (HOST, fields[0])  # (names before the host)
    if host != HOST:
        try:
            return time.time() - path.stat().st_mtime < FOREIGN_STALE_S
        except OSError:
            return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_inside(path, root) -> bool:
    """True when `path` resolves to a place inside `root` (guards against '..' and absolute names)."""
    root = Path(root).resolve()
    try:
        Path(root, path).resolve().relative_to(root)
        return True
    except ValueError:
        return False

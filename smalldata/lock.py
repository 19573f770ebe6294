"""One writer per output folder: each script holds its output folder for its whole run with an exclusive
flock, so a second run on the same folder is refused at once, naming the first (and a killed run's lock
dies with its process)."""
import contextlib
import datetime
import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from .cli import UsageError, forget_log, rank, say

LOCK = ".lock"  # hidden: the image listers never read it


@contextlib.contextmanager
def one_writer(folder, flag="--out", shard=None):
    """Hold `folder` for this run alone, for the whole `with` block: an exclusive flock on <folder>/.lock,
    taken at once or refused with a UsageError naming the run that holds it ("<folder> is in use by process
    N on HOST since TIME"). The kernel drops a flock when its process ends, however it ends, so a killed
    run never blocks the next one.

    Under torchrun only rank 0 takes it: the workers of one job are one run. With `shard` (i, n), this run
    does one of n shares of the folder's work: the shares of one split hold the folder together (a shared
    lock, which still keeps out a whole-folder run), and each share's own lock keeps out a second run of
    the same share and a share of another split. A folder this call had to create is removed again when
    the block ends in an error before anything but the run's log was written there: a refused run leaves
    no folder behind."""
    if rank() != 0:
        yield
        return
    folder = Path(folder)
    created = _first_missing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    try:
        held.append(_lock(folder, LOCK, flag, shared=shard is not None))
        if shard is not None:
            held.append(_lock(folder, f"{LOCK}.shard-{shard[0]}-of-{shard[1]}", flag))
            _refuse_other_splits(folder, shard, flag)
        yield
    except BaseException:
        if created is not None and _holds_nothing(created):
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        for path, fd, exclusive in reversed(held):
            if exclusive:  # (removed while still held: see _lock for why that is safe)
                with contextlib.suppress(OSError):
                    path.unlink()
            os.close(fd)


def _lock(folder, name, flag, shared=False):
    """(path, descriptor, exclusive) of a flock taken on folder/name, or a UsageError naming its holder.

    An exclusive holder removes the file when it is done. A run that opened the file just before that and
    then got the lock holds a file no longer in the folder: it notices (the name now leads to another
    file, or none) and tries again."""
    path = Path(folder) / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            forget_log()  # (the folder's log.txt is the other run's)
            raise UsageError(f"{folder} is in use by {_holder(folder, name)}; wait until it ends, or write "
                             f"elsewhere (another {flag})") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            say(f"warning: {folder}'s file system takes no locks ({e.strerror}); another run writing into it at "
                "the same time would not be stopped")
            return path, fd, False
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if not shared:  # who holds it, for the message a second run gets (written in place: the lock is on this file)
        stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
    return path, fd, not shared


def _holder(folder, name):
    """'process N on HOST since TIME' of the run holding folder/name. The folder's lock held by the shares
    of a split names one of them. A lock file of a killed run still says who wrote it, so only a file
    that is locked right now is read."""
    folder = Path(folder)
    names = [name] + (sorted(p.name for p in folder.glob(f"{LOCK}.shard-*")) if name == LOCK else [])
    for candidate in names:
        if not _held_exclusively(folder / candidate):
            continue
        for _ in range(20):  # a holder writes its line just after it took the lock
            try:
                pid, host, since = (folder / candidate).read_text().split(" ", 2)
            except (OSError, ValueError):
                time.sleep(0.01)
                continue
            share = candidate.rpartition(".shard-")[2].replace("-of-", "/") if ".shard-" in candidate else ""
            return f"process {pid} on {host} since {since.strip()}" + (f" (share {share})" if share else "")
    return "another process"


def _held_exclusively(path):
    try:
        with open(path, "rb") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # (released when the file closes)
            except BlockingIOError:
                return True
    except OSError:
        pass
    return False


def _refuse_other_splits(folder, shard, flag):
    """Shares of another split (0/3 while 0/2 runs) would write the same files: refuse while one runs."""
    for path in Path(folder).glob(f"{LOCK}.shard-*"):
        if not path.name.endswith(f"-of-{shard[1]}") and _held_exclusively(path):
            forget_log()
            raise UsageError(f"{folder} is in use by {_holder(folder, path.name)}, a share of another split; "
                             f"give every share the same N in --shard I/N")


def _first_missing(folder):
    """The outermost folder on the way to `folder` that does not exist yet (what mkdir will create), or None."""
    missing = None
    for path in [Path(folder), *Path(folder).parents]:
        if path.exists():
            break
        missing = path
    return missing


def _holds_nothing(root):
    """True when below `root` there are only folders, lock files and the run's log."""
    return all(p.is_dir() or p.name.startswith(LOCK) or p.name == "log.txt" for p in Path(root).rglob("*"))

"""What every script shares at its edges: the parser, argument types, messages, the run log, exit codes.

Each script reads the same way: a docstring whose first paragraph is the --help description,
build_parser(), main(argv), and `cli.run(main)`. Arguments are checked by their types while
parsing, before any work starts; a bad value is one line on stderr and exit code 2. What a script
says also goes to log.txt in its output folder (log_to), with the details the console leaves out.
"""
import argparse
import datetime
import errno
import math
import os
import shlex
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from . import INTERRUPTED

# 0 done; 1 done, but some inputs were skipped; 2 nothing done (the message says what to do);
# 3 training went non-finite and stopped (the last finite state is kept); 70 a bug (an unexpected
# error: the traceback is in the log); 130 interrupted.
EXIT_OK, EXIT_SKIPPED, EXIT_FAIL, EXIT_NONFINITE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 3, 70, 130


class UsageError(Exception):
    """Nothing can be done: bad arguments, missing model or folders. The message says what to do."""


class NonFiniteError(Exception):
    """Training produced NaN or inf; the message says what, where, what was kept and what to try."""


class InputError(Exception):
    """An input file that cannot be used (images.BadImage); the message names it and says why."""


def rank():
    """This process's rank under torchrun (0 in a plain run). Only rank 0 prints and writes files."""
    return int(os.environ.get("RANK", "0"))


# Under torchrun only rank 0 speaks (training: all workers would say the same), unless the workers
# each do their own part of the work (background removal's shards): then each speaks, named.
WORKERS_SPEAK = False


def speaks():
    return rank() == 0 or WORKERS_SPEAK


def say(msg, file=None):
    """Print without breaking an active tqdm bar, and write the line to the run log."""
    from tqdm import tqdm

    if speaks():
        text = f"[rank {rank()}] {msg}" if rank() else str(msg)
        tqdm.write(text, file=file or sys.stdout)
        log(text)


class _Log:
    """log.txt of the script's output folder; lines said before the folder is known wait in `pending`."""
    path = None
    pending = []


def log_to(folder, header=True):
    """From now on, and for what was said before, append the run's lines to <folder>/log.txt, under a
    line with the time and the command (unless `header` is False: a helper process of the run).
    Progress bars stay on the console only."""
    if not speaks():
        return
    _Log.path = Path(folder) / "log.txt"
    stamp = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    head = [f"===== {stamp}  {command}" + (f"  [rank {rank()}]" if rank() else "")] if header else []
    _Log.pending = [*head, *_Log.pending]  # (written with the next line: a run refused its folder writes none)


def forget_log():
    """This run writes no log after all (refused a folder that another run holds: its log is that run's)."""
    _Log.path, _Log.pending = None, []


def log(text):
    """A line for the log only (details the console summarises)."""
    if not speaks():
        return
    if _Log.path is None:
        _Log.pending.append(str(text))
    else:
        _append([str(text)])


def flush_log():
    """Write what waits for the log's folder, now that it may exist (called at the end of a run)."""
    if _Log.path is not None:
        _append([])


def _append(lines):
    """Append to the log once its folder exists (a run refused before it made its output folder leaves
    none behind); until then the lines wait."""
    if not _Log.path.parent.is_dir():
        _Log.pending.extend(lines)
        return
    lines, _Log.pending = _Log.pending + lines, []
    try:
        with open(_Log.path, "a", encoding="utf-8") as f:  # appends of whole lines: several workers may share it
            f.write("".join(line + "\n" for line in lines))
    except OSError:  # the log must never be the reason a run fails
        pass


def log_path():
    return _Log.path


# Library warnings (torch, numpy, matplotlib...) go to the run log, not the console: they speak of the
# libraries' internals, which a user cannot change. Those that ask the user to act are said as well.
ACT_ON = ("driver", "CUDA initialization")


def _warning_to_log(message, category, filename, lineno, file=None, line=None):
    text = f"warning from a library ({category.__name__} at {Path(filename).name}:{lineno}): {message}"
    if any(words in str(message) for words in ACT_ON):
        say(text, file=sys.stderr)
    else:
        log(text)


warnings.showwarning = _warning_to_log


class Problems:
    """Inputs that were skipped (the exit code becomes 1) or used in another way (noted): the first few
    are named on the console as they happen, every one in the log, and summary() counts them by reason
    and lists them all in a CSV file in the output folder."""
    SHOWN = 5

    def __init__(self):
        self.items = []  # (file, outcome, reason, details)

    def skip(self, path, reason=None, details="", outcome="skipped"):
        if reason is None:  # a BadImage, or "path: reason" text kept in a decode cache
            path, reason = getattr(path, "path", None) or str(path).split(": ", 1)[0], \
                getattr(path, "reason", None) or str(path).split(": ", 1)[-1]
        self.items.append((str(path), outcome, reason, details))
        line = f"{outcome}: {path}: {reason}" + (f" ({details})" if details else "")
        if len(self.items) <= self.SHOWN:
            say(line, file=sys.stderr)
        else:
            log(line)

    def note(self, path, reason, details="", outcome="noted"):
        """An input used otherwise than asked (e.g. copied as it is): listed, but the run is not incomplete."""
        self.skip(path, reason, details, outcome)

    @property
    def skipped(self):
        return [i for i in self.items if i[1] == "skipped"]

    def summary(self, folder=None, name="skipped.csv", what="input file"):
        """One line per outcome and reason with counts, every item in <folder>/<name>, and the count of
        skipped files (the exit code's reason)."""
        if not self.items:
            return
        counts = {}
        for _, outcome, reason, _ in self.items:
            kind = reason.split(" (")[0].split(": ")[0][:80]
            counts[(outcome, kind)] = counts.get((outcome, kind), 0) + 1
        listed = "named above"
        if folder is not None and speaks():
            from . import files

            files.write_csv(Path(folder) / name, ["file", "outcome", "reason", "details"], self.items)
            listed = (f"named above, all in {Path(folder) / name}" if len(self.items) <= self.SHOWN else
                      f"the first {self.SHOWN} named above, all in {Path(folder) / name}")
        say(f"{len(self.items)} {what}(s) not used as asked, by reason:", file=sys.stderr)
        for (outcome, kind), count in sorted(counts.items(), key=lambda kv: -kv[1]):
            say(f"  {count:5d} {outcome}: {kind}", file=sys.stderr)
        if self.skipped:
            say(f"{len(self.skipped)} {what}(s) skipped ({listed}); exit code {EXIT_SKIPPED}", file=sys.stderr)
        else:
            say(f"({listed})", file=sys.stderr)

    def exit_code(self):
        return EXIT_SKIPPED if self.skipped else EXIT_OK


# ---------------------------------------------------------------- the parser

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help, and the docstring's example lines kept as written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(EXIT_FAIL, f"error: {message} (see {self.prog} --help)\n")


def parser(doc):
    """A parser whose --help shows `doc`: its first paragraph as the description, the rest as the epilog."""
    description, _, epilog = doc.strip().partition("\n\n")
    return _Parser(description=description, epilog=epilog or None, formatter_class=_HelpFormatter)


def add_device_arg(p):
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs; auto picks cuda when a GPU is visible")


# ---------------------------------------------------------------- argument types (reject before any work)

# The largest whole number a flag takes: no count, size or seed here needs more, and beyond it the
# libraries' 32-bit arguments overflow (an error deep inside them instead of one line here).
INT_MAX = 2**31 - 1


def _number(kind, text, low, inclusive, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):  # inf and nan: no step here can use them
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if value < low if inclusive else value <= low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    if kind is int and value > INT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {INT_MAX}, got {text}")
    return value


def positive_int(text):
    return _number(int, text, 1, True, "at least 1")


def nonnegative_int(text):
    return _number(int, text, 0, True, "0 or more")


def at_most(kind, limit):
    """An argument type: `kind` (positive_int...) and no more than `limit`."""
    def checked(text):
        value = kind(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit}, got {text}")
        return value
    return checked


def positive_float(text):
    return _number(float, text, 0.0, False, "positive")


def nonnegative_float(text):
    return _number(float, text, 0.0, True, "0 or more")


def share(text):
    value = _number(float, text, 0.0, True, "a share between 0 and 1")
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {text}")
    return value


def existing_dir(text):
    """A folder that must exist (an input)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return path


def output_dir(text):
    """A folder to write into: it may not exist yet, but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return path


def output_file(text):
    """A file to write: it may not exist yet, but must not be a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return path


def existing_file(text):
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}" if not path.exists() else f"{text} is not a file")
    return path


# ---------------------------------------------------------------- running a script

def run(main, memory_hint="lower --batch-size or --img-size"):
    """Run `main(argv) -> exit code` and exit with it. Expected failures are one line and exit 2; an
    unexpected error is a bug: one line that says so and where its traceback is, and exit 70. Running out
    of memory is a resource, not a bug: one line with `memory_hint`, the flags that change what a run
    needs, and exit 2."""
    where = f"[rank {rank()}] " if rank() else ""  # torchrun: a worker's own error names it
    try:
        code = main(sys.argv[1:])
    except (UsageError, InputError) as e:
        print(f"{where}error: {e}", file=sys.stderr)
        log(f"error: {e}")
        code = EXIT_FAIL
    except NonFiniteError as e:
        print(f"{where}error: {e}", file=sys.stderr)
        log(f"error: {e}")
        code = EXIT_NONFINITE
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        log("interrupted")
        code = EXIT_INTERRUPTED
    except OSError as e:
        log(traceback.format_exc())
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full, or over quota
            print(f"{where}error: disk full while writing ({e}); files already written are intact, "
                  "free some space and rerun to continue", file=sys.stderr)
        else:  # a file or folder the system refused (permissions, a vanished mount): not our bug
            print(f"{where}error: {e}", file=sys.stderr)
        code = EXIT_FAIL
    except Exception as e:  # noqa: BLE001 - everything else is a bug of ours, unless memory ran out
        memory = out_of_memory(e)
        if memory:
            log(traceback.format_exc())
            print(f"{where}error: out of {memory}: the run needed more than this machine has; {memory_hint}, or free "
                  "some memory, and rerun", file=sys.stderr)
            code = EXIT_FAIL
        else:
            path = bug_report(traceback.format_exc())
            print(f"{where}error: this is a bug in the pipeline, not in your data or flags ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}); the traceback is in {path}; please report it",
                  file=sys.stderr)
            code = EXIT_BUG
    flush_log()
    sys.exit(code)


def out_of_memory(error):
    """'RAM' or 'GPU memory' when `error` says that memory ran out (Python's and NumPy's MemoryError, torch's
    allocators), else None."""
    if isinstance(error, MemoryError):
        return "RAM"
    if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: CUDA's allocator
        return "GPU memory"
    if isinstance(error, RuntimeError) and "can't allocate memory" in str(error):  # torch's CPU allocator
        return "RAM"
    return None


def bug_report(text):
    """Put a traceback into the run log (or, before one is open, a file of its own); returns where."""
    if _Log.path is not None and speaks():
        try:
            _Log.path.parent.mkdir(parents=True, exist_ok=True)
            log(text)
            return _Log.path
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix=f"smalldata-{Path(sys.argv[0]).stem}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(_Log.pending + [text]))
    return path


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

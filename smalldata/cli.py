"""What every script shares at its edges: the parser, argument types, messages, exit codes.

Each script reads the same way: a docstring whose first paragraph is the --help description,
build_parser(), main(argv), and `cli.run(main)`. Arguments are checked by their types while
parsing, before any work starts; a bad value is one line on stderr and exit code 2.
"""
import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

EXIT_OK, EXIT_SKIPPED, EXIT_FAIL = 0, 1, 2


class UsageError(Exception):
    """Nothing can be done: bad arguments, missing model or folders. The message says what to do."""


class InputError(Exception):
    """An input file that cannot be used (images.BadImage); the message names it and says why."""


def rank():
    """This process's rank under torchrun (0 in a plain run). Only rank 0 prints and writes files."""
    return int(os.environ.get("RANK", "0"))


# Under torchrun only rank 0 speaks (training: all workers would say the same), unless the workers
# each do their own part of the work (background removal's shards): then each speaks, named.
WORKERS_SPEAK = False


def say(msg, file=None):
    """Print without breaking an active tqdm bar."""
    from tqdm import tqdm

    if rank() == 0 or WORKERS_SPEAK:
        tqdm.write(f"[rank {rank()}] {msg}" if rank() else str(msg), file=file or sys.stdout)


class Problems:
    """Collects inputs that were skipped; each one is named on stderr when it happens."""

    def __init__(self):
        self.items = []

    def skip(self, path, reason=None):
        text = f"{path}: {reason}" if reason else str(path)
        self.items.append(text)
        say(f"skipped: {text}", file=sys.stderr)

    def summary(self, what="input file"):
        if self.items:
            say(f"{len(self.items)} {what}(s) skipped (named above); exit code {EXIT_SKIPPED}", file=sys.stderr)

    def exit_code(self):
        return EXIT_SKIPPED if self.items else EXIT_OK


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

def _number(kind, text, low, inclusive, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or (value < low if inclusive else value <= low):  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text):
    return _number(int, text, 1, True, "at least 1")


def nonnegative_int(text):
    return _number(int, text, 0, True, "0 or more")


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


def existing_file(text):
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}" if not path.exists() else f"{text} is not a file")
    return path


# ---------------------------------------------------------------- running a script

def run(main):
    """Run `main(argv) -> exit code` and exit with it; expected failures become one line and exit 2."""
    where = f"[rank {rank()}] " if rank() else ""  # torchrun: a worker's own error names it
    try:
        code = main(sys.argv[1:])
    except (UsageError, InputError) as e:
        print(f"{where}error: {e}", file=sys.stderr)
        code = EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        code = 130
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full, or over quota
            print(f"error: disk full while writing ({e}); files already written are intact, "
                  "free some space and rerun to continue", file=sys.stderr)
        else:
            traceback.print_exc()
        code = EXIT_FAIL
    sys.exit(code)


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

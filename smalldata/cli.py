"""What every script shares at its edges: exit codes, error messages, skipped-file reports."""
import argparse
import errno
import sys
import traceback

EXIT_OK, EXIT_SKIPPED, EXIT_FAIL = 0, 1, 2


class UsageError(Exception):
    """Nothing can be done: bad arguments, missing model or folders. The message says what to do."""


class CheckpointError(Exception):
    """A checkpoint that cannot or must not be used; the message says which file and why."""


def say(msg, file=None):
    """Print without breaking an active tqdm bar."""
    from tqdm import tqdm

    tqdm.write(str(msg), file=file or sys.stdout)


class Problems:
    """Collects inputs that were skipped; each one is named on stderr when it happens."""

    def __init__(self):
        self.items = []

    def skip(self, path, reason=None):
        text = f"{path}: {reason}" if reason else str(path)
        self.items.append(text)
        say(f"skipped: {text}", file=sys.stderr)

    def __len__(self):
        return len(self.items)

    def summary(self, what="input file"):
        if self.items:
            say(f"{len(self.items)} {what}(s) skipped (named above); exit code {EXIT_SKIPPED}",
                file=sys.stderr)

    def exit_code(self):
        return EXIT_SKIPPED if self.items else EXIT_OK


def main_wrapper(main):
    """Run `main(argv) -> exit code`, turning expected failures into a message and exit 2."""
    from .images import BadImage

    try:
        code = main(sys.argv[1:])
    except (UsageError, CheckpointError, BadImage) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        code = 130
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full, or over quota
            print(f"error: disk full while writing ({e}); files already written are intact, "
                  "free some space and rerun to continue", file=sys.stderr)
            code = EXIT_FAIL
        else:
            traceback.print_exc()
            code = EXIT_FAIL
    sys.exit(code)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help, and the example lines of the epilog kept as written."""


def parser(description, epilog=None):
    return argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=_HelpFormatter)


def add_device_arg(p):
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs; auto picks cuda when a GPU is visible")


def resolve_device(name):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no GPU; use --device cpu")
    return torch.device(name)

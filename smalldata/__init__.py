"""Shared code of the small-data pipeline: folders, images, model, checkpoints, training.

The five top-level scripts are thin entry points over these modules; they talk to
each other only through the files described in README.md.
"""
import os
import sys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERRUPTED = "interrupted; rerun the same command to continue where it stopped"


def _quiet_interrupt(kind, value, tb, previous=sys.excepthook):
    """Ctrl-C before a script's cli.run has started (while torch is imported, say): the same one line and
    exit code 130 as later, not a traceback of the import."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stdout.flush()
        print(INTERRUPTED, file=sys.stderr, flush=True)
        os._exit(130)
    previous(kind, value, tb)


if sys.excepthook is sys.__excepthook__:
    sys.excepthook = _quiet_interrupt

"""Score a checkpoint on a folder of photos, and draw where it goes wrong.

Example:
    python check_score.py --checkpoint checkpoints/final.pth --data data/val --out checkpoints/score

The architecture, classes, image size and normalisation come from the checkpoint.
A labelled folder (<class>/<image>) prints top-1 (and top-5 with more than 5 classes)
accuracy, macro-averaged recall and the most confused class pairs, and writes
score.json, predictions.csv, per_class.csv, confusion.png and mistakes.png to --out.
A flat folder of images gets predictions.csv only (file, predicted, confidence, top5).

Exit codes: 0 done; 1 done, but some files were skipped (each named on stderr);
2 nothing done (missing or refused checkpoint, missing folder, unknown class).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smalldata import score  # noqa: E402
from smalldata.cli import add_device_arg, main_wrapper, parser  # noqa: E402


class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows each flag's default."""


def main(argv):
    p = parser(__doc__)
    p.formatter_class = HelpFormat
    p.add_argument("--checkpoint", default="checkpoints/final.pth",
                   help="checkpoint to score (opened with weights_only=True: a file carrying code is refused)")
    p.add_argument("--data", default="data/val",
                   help="labelled folder <class>/<image>, or a flat folder of images to predict")
    p.add_argument("--out", default="checkpoints/score", help="folder for the score, predictions and pictures")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the softmax of each image and its mirror image")
    p.add_argument("--mistakes", type=int, default=48, help="at most this many wrong images in mistakes.png")
    return score.run(p.parse_args(argv))


if __name__ == "__main__":
    main_wrapper(main)

"""One-class CutMix (OCM): new training images made by pasting a random box of one photo into
another photo of the same class, so the label stays true while the model sees new combinations.

    python make_cutmix.py --src data/train --dst data/ocm --count 500 --img-size 256 --seed 0
    python make_cutmix.py --src data/train --src data/br --preview ocm_preview.png  # boxes from BR copies too

Writes <dst>/<class>/ocm_<NNNNN>.png, <dst>/manifest.csv (base photo, patch photo, box and lambda of
each image) and <dst>/ocm_args.json (arguments + source fingerprint). The same command again skips
what exists; different arguments into a non-empty --dst are refused unless --overwrite is given.
Exit codes: 0 done, 1 some inputs skipped (named on stderr), 2 nothing done.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smalldata import cli, cutmix  # noqa: E402

DEFAULT_SRC = "data/train"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv):
    description, epilog = __doc__.split("\n\n", 1)
    p = cli.parser(description, epilog=epilog)
    p.formatter_class = HelpFormatter  # keep the examples' line breaks
    p.add_argument("--src", action="append", metavar="DIR", default=argparse.SUPPRESS,
                   help=f"class folders to draw photos from; repeat to pool several with the same classes "
                        f"(e.g. --src data/train --src data/br). Default: {DEFAULT_SRC} only, as in the "
                        "original recipe: background-removed copies are the same photos again, so adding "
                        "them is a choice (a photo is never mixed with its own copy). Never data/val or "
                        "data/test (that would leak held-out photos into training)")
    p.add_argument("--dst", default="data/ocm", help="output folder: <dst>/<class>/ocm_<NNNNN>.png")
    p.add_argument("--count", type=int, default=500,
                   help="images to make in all, spread evenly over the classes (the original: 500 from 200 photos)")
    p.add_argument("--img-size", type=int, default=256, help="side of the square outputs; A and B are squeezed to it")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="lambda ~ Beta(alpha, alpha) is the share of the image kept from the base photo; "
                        "1.0 is uniform, as in the CutMix paper")
    p.add_argument("--seed", type=int, default=0, help="same seed, inputs and arguments give byte-identical files")
    p.add_argument("--overwrite", action="store_true",
                   help="delete this script's earlier outputs in --dst (ocm_*.png, manifest, args file) "
                        "and start over; needed when the arguments or sources changed")
    p.add_argument("--preview", metavar="PATH.png",
                   help="also write a contact sheet of a sample: base A, patch B, result with the box drawn")
    p.add_argument("--preview-rows", type=int, default=8, help="images shown in the --preview sheet")
    args = p.parse_args(argv)
    args.src = getattr(args, "src", None) or [DEFAULT_SRC]
    return cutmix.run(args)


if __name__ == "__main__":
    cli.main_wrapper(main)

"""One-class CutMix (OCM): new training images made by pasting a random box of one photo into
another photo of the same class, so the label stays true while the model sees new combinations.

    python make_cutmix.py --src data/train --dst data/ocm --count 500 --img-size 256 --seed 0
    python make_cutmix.py --src data/train --src data/br --preview ocm_preview.png  # boxes from BR copies too

Writes <dst>/<class>/ocm_<NNNNN>.png, <dst>/manifest.csv (base photo, patch photo, box and lambda of
each image), <dst>/ocm_args.json (arguments + source fingerprint) and, last, <dst>/complete.json (what
was asked, the source photos and every file made: training reads it). The same command again skips
what exists; different arguments into a non-empty --dst are refused unless --overwrite is given.
One run writes into --dst at a time; a second is refused.
Exit codes: 0 done, 1 some inputs skipped (named on stderr), 2 nothing done.
"""
import argparse
from pathlib import Path

from smalldata import cli, cutmix, images

DEFAULT_SRC = "data/train"


def main(argv=None):
    args = build_parser().parse_args(argv)
    images.set_max_pixels(args.max_pixels)
    if not args.src and not Path(DEFAULT_SRC).is_dir():  # (a repeatable flag has no default argparse checks)
        raise cli.UsageError(f"{DEFAULT_SRC} not found: put your photos in {DEFAULT_SRC}/<class>/<image>, "
                             "or give --src DIR")
    return cutmix.run(argparse.Namespace(**{**vars(args), "src": args.src or [Path(DEFAULT_SRC)]}))


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--src", action="append", metavar="DIR", type=cli.existing_dir,
                   help=f"class folders to draw photos from (default: {DEFAULT_SRC}); repeat to pool several "
                        "with the same classes (e.g. --src data/train --src data/br). Drawing from data/train "
                        "only is our default: BR copies are the same photos again (a photo is never mixed "
                        "with its own copy). Never data/val or data/test (held-out photos would leak)")
    p.add_argument("--dst", type=cli.output_dir, default="data/ocm",
                   help="output folder: <dst>/<class>/ocm_<NNNNN>.png")
    p.add_argument("--count", type=cutmix.count_arg, default=500,
                   help="images to make in all, spread evenly over the classes")
    p.add_argument("--img-size", type=cutmix.img_size_arg, default=256,
                   help="side of the square outputs; both photos are squeezed to it")
    p.add_argument("--alpha", type=cli.positive_float, default=1.0,
                   help="lambda ~ Beta(alpha, alpha) is the share of the image kept from the base photo; "
                        "1.0 is uniform, as in the CutMix paper")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="same seed, inputs and arguments give byte-identical files")
    p.add_argument("--overwrite", action="store_true",
                   help="delete this script's earlier outputs in --dst (ocm_*.png, manifest, args file) "
                        "and start over; needed when the arguments or sources changed")
    p.add_argument("--preview", metavar="PATH.png",
                   help="also write a contact sheet of a sample: base A, patch B, result with the box drawn")
    p.add_argument("--preview-rows", type=cli.positive_int, default=8, help="images shown in the --preview sheet")
    images.add_max_pixels_arg(p)
    return p


if __name__ == "__main__":
    cli.run(main, memory_hint="lower --img-size")

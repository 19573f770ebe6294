"""BR step: remove the background of every training photo, keeping class folders.

For each data/train/<class>/.../<name>.<ext> it writes data/br/<class>/.../<name>.png: the object
found by a rembg model, composited onto a plain colour (white by default), so the classifier
learns the object rather than the scene. Every input file is either written, or named on stderr.

    python make_remove_background.py --src data/train --dst data/br --model u2netp --preview br.png

Many GPUs or machines: `torchrun --standalone --nproc_per_node=N make_remove_background.py ...`, or
`--shard I/N` in N separate processes, each writing its own share into the same --dst.

Exit codes: 0 all done; 1 finished, but some inputs were skipped (not images, corrupt, outside a
class folder, or no object found: each named on stderr, then a summary line); 2 nothing done
(bad arguments, missing model or folders, --dst in use by another run). Reruns skip outputs that exist
(--overwrite redoes); <dst>/args.json records the arguments, and a rerun with others is refused
unless --fresh. Refused and failed photos are listed in <dst>/skipped.csv, what was said in
<dst>/log.txt. When every photo has been dealt with, <dst>/complete.json records what was asked, the
source photos and the images made; training refuses a --dst without it (an unfinished run).

No object found, or found unsure: when the share of pixels the mask calls object (mask > 127) is
below --min-fg or above --max-fg, or when the mask is unsure of the object (of the pixels it touches,
fewer than --min-confidence are clearly object: composited, the object would be a faint ghost), the
file is skipped (counted as degenerate, exit 1), or with --fallback copy the original photo is
written instead (named on stderr, not a skip).
"""
from pathlib import Path

from smalldata import background, cli, images, rembg_api


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    images.set_max_pixels(args.max_pixels)
    rembg_api.skip_matting_compile(args.alpha_matting)
    if args.list_models:
        return background.list_models()
    if not args.min_fg < args.max_fg:
        p.error("need --min-fg < --max-fg (shares, e.g. 0.02 and 0.98)")
    return background.run(args)


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--src", type=Path, default=Path("data/train"),
                   help="training photos, <src>/<class>/<image>; sub-folders under a class are kept")
    p.add_argument("--dst", type=cli.output_dir, default=Path("data/br"),
                   help="output folder; gets <dst>/<class>/<relative path>/<stem>.png")
    p.add_argument("--model", default="u2net",
                   help=f"any rembg model name; see --list-models for those available offline (after set-up: "
                        f"{rembg_api.OFFLINE_MODEL})")
    p.add_argument("--list-models", action="store_true",
                   help="print rembg's models and which are available offline now, then exit")
    p.add_argument("--bg-color", type=background.parse_color, default="white",
                   help="background colour: white, black, gray, R,G,B, or auto: per photo, the plain colour "
                        "farthest from the object's own colours (listed in <dst>/bg_colors.csv)")
    p.add_argument("--keep-alpha", action="store_true", help="write RGBA (the mask as alpha, same colours)")
    p.add_argument("--alpha-matting", action="store_true", help="refine edges with rembg's alpha matting (slow)")
    p.add_argument("--post-process-mask", action="store_true",
                   help="rembg's mask clean-up (morphological opening + smoothing, binary mask)")
    p.add_argument("--min-fg", type=cli.share, default=background.MIN_FG,
                   help="below this share of object pixels (mask > 127) the object was not found")
    p.add_argument("--max-fg", type=cli.share, default=background.MAX_FG,
                   help="above this share of object pixels the object was not found")
    p.add_argument("--min-confidence", type=cli.share, default=background.MIN_CONFIDENCE,
                   help="below this share of sure pixels (mask >= 90 %% of those >= 10 %%) the mask is unsure "
                        "and the object would come out as a ghost; 0 turns the check off")
    p.add_argument("--fallback", choices=["skip", "copy"], default="skip",
                   help="when no object is found, or it is found unsure: skip the file, or write the original photo")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--fresh", action="store_true",
                   help="delete the BR images of an earlier run in --dst (needed when the arguments changed), "
                        "then start over")
    p.add_argument("--masks", type=cli.output_dir, metavar="DIR",
                   help="also write each photo's mask (8-bit grey PNG, 255 = object) to DIR/<class>/<stem>.png")
    p.add_argument("--preview", type=Path, help="write a contact sheet PNG here: originals beside their BR images")
    p.add_argument("--preview-count", type=cli.positive_int, default=12, help="how many images the preview shows")
    cli.add_device_arg(p)
    p.add_argument("--providers", help="onnxruntime execution providers, comma list (overrides --device), "
                                       "e.g. CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--threads", type=cli.at_most(cli.nonnegative_int, 256), default=0,
                   help="onnxruntime intra-op threads per inference; 0 = auto: CPU cores/4, at least 1; "
                        "all cores on a GPU")
    p.add_argument("--workers", type=cli.at_most(cli.nonnegative_int, 256), default=0,
                   help="threads that decode, composite, encode and write around the model; 0 = auto")
    p.add_argument("--shard", type=background.parse_shard, metavar="I/N",
                   help="do only the I-th of N shares of the photos (0-based; by a checksum of each relative "
                        "path, so N processes or machines split the work without overlap and write what one "
                        "process would); under torchrun each worker takes its rank's share and its own GPU")
    p.add_argument("--png-level", type=int, default=1, choices=range(10), metavar="0-9",
                   help="PNG compression (lossless at any level; 1 is fast, 9 is smallest)")
    images.add_max_pixels_arg(p)
    return p


if __name__ == "__main__":
    cli.run(main, memory_hint="lower --workers (fewer photos decoded at once) or --max-pixels")

"""Score a checkpoint on a folder of photos, and draw where it goes wrong.

    python check_score.py --checkpoint checkpoints/final.pth --data data/val --out checkpoints/score
    python check_score.py --data data/test     # the hold-out: no epoch was chosen on it

The architecture, classes, image size and normalisation come from the checkpoint.
A labelled folder (<class>/<image>) prints top-1 (and top-5 with more than 5 classes)
accuracy, macro-averaged recall and the most confused class pairs, and writes
score.json, predictions.csv, per_class.csv, confusion.png and mistakes.png to --out/<name of
the scored folder>/ (checkpoints/score/val/, checkpoints/score/test/: each folder keeps its own).
A flat folder of images gets predictions.csv only (file, predicted, confidence, top5).

Exit codes: 0 done; 1 done, but some files were skipped (each named on stderr);
2 nothing done (missing or refused checkpoint, missing folder, unknown class, the score folder
in use by another run).
"""
from smalldata import cli, images, score


def main(argv=None):
    args = build_parser().parse_args(argv)
    images.set_max_pixels(args.max_pixels)
    return score.run(args)


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", type=cli.existing_file, default="checkpoints/final.pth",
                   help="checkpoint to score (opened with weights_only=True: a file carrying code is refused)")
    p.add_argument("--data", type=cli.existing_dir, default="data/val",
                   help="labelled folder <class>/<image>, or a flat folder of images to predict")
    p.add_argument("--out", type=cli.output_dir, default="checkpoints/score",
                   help="folder for the scores: each scored folder gets its own sub-folder, named after it")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per forward pass")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the softmax of each image and its mirror image")
    p.add_argument("--mistakes", type=cli.positive_int, default=48, help="at most this many wrong images in mistakes.png")
    p.add_argument("--cache-dir", type=cli.output_dir,
                   help="decode cache to read or write (default: cache/ beside the checkpoint, where its training "
                        "stages keep theirs)")
    p.add_argument("--no-cache", action="store_true", help="decode every photo; read and write no decode cache")
    cli.add_device_arg(p)
    images.add_max_pixels_arg(p)
    return p


if __name__ == "__main__":
    cli.run(main, memory_hint="lower --batch-size")

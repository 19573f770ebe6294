"""Stage 1 of the recipe: train VGG-13-BN at lr 1e-4 on the original, background-removed (BR) and
One-class CutMix (OCM) photos, and keep the epoch where the train/validation gap starts to widen
beyond noise as checkpoints/divergence.pth.

    python model_1e-4.py --data data --out checkpoints
    python model_1e-4.py --watch data/test      # also log a hold-out's accuracy (analysis only)

Writes checkpoints/1e-4/{metrics.csv, curves.png, divergence.json, args.json, last.pth, best.pth,
epochs/} and checkpoints/divergence.pth. Rerunning the same command continues an interrupted run,
or does nothing when it is finished. The rule is explained in divergence.json and docs/scripts.md.
"""
from smalldata import cli, rule as rules, stages
from smalldata.model import arch_name


def main(argv=None):
    return stages.stage1(build_parser().parse_args(argv))


def build_parser():
    p = cli.parser(__doc__)
    stages.add_training_args(p, lr=1e-4, epochs=100)
    p.add_argument("--arch", type=arch_name, default="vgg13_bn", help="any torchvision classification model name")
    p.add_argument("--weights", default="imagenet",
                   help="start from: imagenet (torchvision's ImageNet weights, new head), none (scratch), "
                        "or PATH to a checkpoint of ours")
    p.add_argument("--img-size", type=cli.positive_int, default=256, help="photos are squeezed to this square size")
    rules.add_args(p)
    return p


if __name__ == "__main__":
    cli.run(main)

"""Stage 1 of the recipe: train VGG-13-BN at lr 1e-4 on the original, background-removed (BR) and
One-class CutMix (OCM) photos until the train/validation gap starts to widen beyond noise, and keep
that epoch as checkpoints/divergence.pth (stage 2 starts there).

    python model_1e-4.py --data data --out checkpoints
    python model_1e-4.py --watch data/test      # also log a hold-out's accuracy (analysis only)

Writes checkpoints/divergence.pth (the rule's epoch), swa.pth and ema.pth (weight averages kept beside
it, each scored), and checkpoints/stage1/{metrics.csv, val_losses.csv, train_losses.csv, curves.png,
divergence.json, args.json, last.pth, best.pth, epochs/}. Rerunning the same command continues an
interrupted run, or does nothing when it is finished. The rule is explained in divergence.json and
docs/scripts.md.
"""
from smalldata import cli, rule as rules, settings, stage
from smalldata.model import arch_name


def main(argv=None):
    return stage.run_stage(settings.stage1_spec(build_parser().parse_args(argv)))


def build_parser():
    p = cli.parser(__doc__)
    groups = settings.add_training_args(p, lr=1e-4, epochs=100)
    groups["model"].add_argument("--arch", type=arch_name, default="vgg13_bn",
                                 help="any torchvision classification model name")
    groups["model"].add_argument("--weights", default="imagenet",
                                 help="start from: imagenet (torchvision's ImageNet weights, new head), none "
                                      "(scratch), or PATH to a checkpoint of ours")
    groups["model"].add_argument("--img-size", type=cli.positive_int, default=256,
                                 help="photos are squeezed to this square size")
    rules.add_args(groups["rule"])
    settings.add_candidate_args(p)
    return p


if __name__ == "__main__":
    cli.run(main)

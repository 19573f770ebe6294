"""Stage 1 of the recipe: train VGG-13-BN at lr 1e-4 on originals + BR + OCM images, and keep
the checkpoint where the train/validation gap starts to widen sharply (checkpoints/divergence.pth).

    python model_1e-4.py --data data --out checkpoints
    python model_1e-4.py --resume checkpoints/1e-4/last.pth     # continue an interrupted run

Writes checkpoints/1e-4/{metrics.csv, curves.png, last.pth, best.pth, divergence.json, epochs/}
and checkpoints/divergence.pth. Rerunning the same command continues or skips a finished run.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smalldata import cli, stages  # noqa: E402


def main(argv):
    p = cli.parser(__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default="data", help="folder with train/, val/ and optionally br/, ocm/")
    p.add_argument("--out", default="checkpoints", help="where checkpoints, metrics and plots go")
    p.add_argument("--arch", default="vgg13_bn", help="any torchvision classification model name")
    p.add_argument("--weights", default="imagenet",
                   help="start from: imagenet (torchvision's ImageNet weights, new head), none (scratch), "
                        "or PATH to a checkpoint of ours")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay (the original used none)")
    p.add_argument("--epochs", type=int, default=100, help="most epochs to train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=256, help="images are squeezed to this square size")
    p.add_argument("--no-br", action="store_true", help="leave data/br out of the training set")
    p.add_argument("--no-ocm", action="store_true", help="leave data/ocm out of the training set")
    p.add_argument("--gap-jump", type=float, default=5.0,
                   help="divergence rule: points the train-val gap must grow by over the window")
    p.add_argument("--gap-window", type=int, default=3, help="divergence rule: window in epochs")
    p.add_argument("--patience", type=int, default=0, help="epochs to keep training after the rule fires")
    p.add_argument("--keep-all", action="store_true",
                   help="keep every epoch's checkpoint in 1e-4/epochs/ (about 0.5 GB each for VGG-13)")
    p.add_argument("--resume", help="continue from this last.pth exactly (epochs, optimizer, RNG, history)")
    p.add_argument("--fresh", action="store_true", help="delete this stage's earlier run and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (slower on GPU); CPU runs are repeatable anyway")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first epoch)")
    cli.add_device_arg(p)
    args = p.parse_args(argv)
    if args.gap_window < 1 or args.epochs < 1 or args.batch_size < 2:
        raise cli.UsageError("--gap-window and --epochs must be at least 1, --batch-size at least 2")
    return stages.stage1(args)


if __name__ == "__main__":
    cli.main_wrapper(main)

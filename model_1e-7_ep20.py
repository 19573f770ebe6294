"""Stage 2 of the recipe: start from the divergence checkpoint and fine-tune 20 epochs at lr 1e-7
with a fresh Adam, keeping the train/validation gap closed; the best epoch becomes
checkpoints/final.pth.

    python model_1e-7_ep20.py --data data --out checkpoints
    python model_1e-7_ep20.py --init checkpoints/1e-4/epochs/epoch_012.pth   # an epoch you picked

A fresh Adam, because the checkpoint carries weights only and Adam's moment estimates from
the 1e-4 run would be stale at a learning rate 1000 times smaller. Architecture, classes,
image size and normalisation come from the --init checkpoint.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smalldata import cli, stages  # noqa: E402


def main(argv):
    p = cli.parser(__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data", default="data", help="folder with train/, val/ and optionally br/, ocm/")
    p.add_argument("--out", default="checkpoints", help="where checkpoints, metrics and plots go")
    p.add_argument("--init", help="checkpoint to start from (default: <--out>/divergence.pth)")
    p.add_argument("--lr", type=float, default=1e-7, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-br", action="store_true", help="leave data/br out of the training set")
    p.add_argument("--no-ocm", action="store_true", help="leave data/ocm out of the training set")
    p.add_argument("--keep-all", action="store_true", help="keep every epoch's checkpoint in 1e-7/epochs/")
    p.add_argument("--resume", help="continue from this last.pth exactly")
    p.add_argument("--fresh", action="store_true", help="delete this stage's earlier run and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first epoch)")
    cli.add_device_arg(p)
    args = p.parse_args(argv)
    args.init = args.init or str(Path(args.out) / "divergence.pth")
    stat = Path(args.init).stat() if Path(args.init).is_file() else None
    args.init_id = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else None  # a retrained --init is a new run
    if args.epochs < 1 or args.batch_size < 2:
        raise cli.UsageError("--epochs must be at least 1, --batch-size at least 2")
    return stages.stage2(args)


if __name__ == "__main__":
    cli.main_wrapper(main)

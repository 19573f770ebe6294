"""Stage 2 of the recipe: start from the divergence checkpoint and fine-tune 20 epochs at lr 1e-7
with a fresh Adam, keeping the train/validation gap closed; the last epoch becomes checkpoints/final.pth.

    python model_1e-7_ep20.py --data data --out checkpoints
    python model_1e-7_ep20.py --init checkpoints/swa.pth                          # another of stage 1's
    python model_1e-7_ep20.py --init checkpoints/stage1/epochs/epoch_012.pth      # an epoch you picked
    python model_1e-7_ep20.py --keep best      # keep the steady best-val epoch instead of the last

A fresh Adam, because the checkpoint carries weights only and Adam's moment estimates from the
1e-4 run would be stale at a learning rate 1000 times smaller. Architecture, classes, image size
and normalisation come from the --init checkpoint. Writes checkpoints/stage2/{metrics.csv,
curves.png, final.json, args.json, last.pth} and checkpoints/final.pth; rerunning continues or skips.
"""
from smalldata import cli, rule as rules, settings, stage


def main(argv=None):
    return stage.run_stage(settings.stage2_spec(build_parser().parse_args(argv)))


def build_parser():
    p = cli.parser(__doc__)
    groups = settings.add_training_args(p, lr=1e-7, epochs=20)
    groups["model"].add_argument("--init", type=cli.existing_file,
                                 help="checkpoint to start from (default: <--out>/divergence.pth)%(default).0s")
    rules.add_keep_arg(groups["rule"])
    return p


if __name__ == "__main__":
    cli.run(main)

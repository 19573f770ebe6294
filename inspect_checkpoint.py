"""Explain a checkpoint: model, classes, input and preprocessing, epoch and metrics, the decision that kept
it, the arguments and versions that made it; compare two; export one to ONNX.

    python inspect_checkpoint.py checkpoints/divergence.pth
    python inspect_checkpoint.py checkpoints/final.pth --compare checkpoints/divergence.pth
    python inspect_checkpoint.py checkpoints/final.pth --onnx model.onnx    # checked with onnxruntime

Files are opened with torch.load(..., weights_only=True): a file carrying code is refused, never run.
The ONNX model takes normalised float32 N x 3 x S x S images and returns logits; its metadata holds the
classes, image size, mean, std and the preprocessing. Exit codes: 0 done; 2 nothing done (missing or
refused file, or an export whose outputs differ from PyTorch's).
"""
from smalldata import cli, images, inspection
from smalldata.cli import say


def main(argv=None):
    args = build_parser().parse_args(argv)
    images.set_max_pixels(args.max_pixels)
    for line in inspection.summary(args.checkpoint):
        say(line)
    if args.compare:
        say("")
        for line in inspection.compare(args.checkpoint, args.compare):
            say(line)
    if args.onnx:
        say("")
        for line in inspection.export_onnx(args.checkpoint, args.onnx, args.photos):
            say(line)
    return cli.EXIT_OK


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("checkpoint", type=cli.existing_file, help="a .pth file of this pipeline")
    p.add_argument("--compare", type=cli.existing_file, metavar="OTHER",
                   help="another checkpoint: the arguments and metrics that differ, the layers that differ most")
    p.add_argument("--onnx", type=cli.output_file, metavar="OUT.onnx",
                   help="export the model to ONNX and check onnxruntime's outputs against PyTorch's")
    p.add_argument("--photos", type=cli.existing_dir,
                   help="photos for the ONNX check (default: the checkpoint's data/val, else random inputs)")
    images.add_max_pixels_arg(p)
    return p


if __name__ == "__main__":
    cli.run(main)

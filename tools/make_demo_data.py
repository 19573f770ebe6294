"""Write the demo dataset: Fashion-MNIST (Zalando's product photos, 10 classes) into data/.

    python tools/make_demo_data.py --train 20 --val 10 --test 10

Reads the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) when it is
installed, else downloads through torchvision into a temporary folder. Images are chosen with a
fixed seed and saved as RGB PNG in data/{train,val,test}/<class>/. A marker file
data/.demo.json tells later runs that data/ holds the demo, so it is never written over a
user's own photos without --overwrite.
"""
import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smalldata import files  # noqa: E402

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
MARKER = ".demo.json"


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist():
    """(images N,28,28 uint8, labels N) of the 70,000 images, train and test files together."""
    folder = DEBIAN_DIR
    tmp = None
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        from torchvision.datasets import FashionMNIST

        tmp = tempfile.mkdtemp()
        print(f"{DEBIAN_DIR} not found (apt-get install dataset-fashion-mnist); downloading with torchvision")
        FashionMNIST(tmp, train=True, download=True)
        FashionMNIST(tmp, train=False, download=True)
        folder = Path(tmp) / "FashionMNIST" / "raw"
    try:
        x = np.concatenate([read_idx(folder / "train-images-idx3-ubyte.gz"), read_idx(folder / "t10k-images-idx3-ubyte.gz")])
        y = np.concatenate([read_idx(folder / "train-labels-idx1-ubyte.gz"), read_idx(folder / "t10k-labels-idx1-ubyte.gz")])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return x, y


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data", help="where train/, val/, test/ are written")
    p.add_argument("--train", type=int, default=20, help="training images per class")
    p.add_argument("--val", type=int, default=10, help="validation images per class")
    p.add_argument("--test", type=int, default=10, help="test images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace whatever data/ holds")
    args = p.parse_args()

    data = Path(args.data)
    wanted = {"dataset": "fashion-mnist", "train": args.train, "val": args.val, "test": args.test, "seed": args.seed}
    marker = data / MARKER
    splits = [data / s for s in ("train", "val", "test")]
    if marker.exists() and json.loads(marker.read_text()) == wanted and not args.overwrite:
        print(f"demo data already in {data}: {args.train}/{args.val}/{args.test} per class; nothing to do")
        return 0
    if any(s.exists() and any(s.iterdir()) for s in splits) and not marker.exists() and not args.overwrite:
        print(f"error: {data} already holds photos that are not the demo; refusing to write over them "
              "(use --overwrite, or --data another folder)", file=sys.stderr)
        return 2
    for s in (*splits, data / "br", data / "ocm"):  # derived folders belong to the old data
        shutil.rmtree(s, ignore_errors=True)
    marker.unlink(missing_ok=True)

    x, y = load_fashion_mnist()
    rng = np.random.default_rng(args.seed)
    for c, name in enumerate(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
            for i in idx[start:start + n]:
                files.save_image(Image.fromarray(x[i]).convert("RGB"), data / split / name / f"fmnist_{i:05d}.png")
            start += n
    files.write_json(marker, wanted)
    print(f"demo data written to {data}: {len(CLASSES)} classes, {args.train} train / {args.val} val / "
          f"{args.test} test per class (Fashion-MNIST, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the demo dataset into data/: 400 Fashion-MNIST product photos (10 classes) shipped in the repository.

    python tools/make_demo_data.py --train 20 --val 10 --test 10

The images come from tools/demo_data/fashion_mnist_400.npz (20 train, 10 val and 10 test photos per
class; MIT licence, see tools/demo_data/README.md): nothing is downloaded. They are saved as RGB PNG
in data/{train,val,test}/<class>/. A marker file data/.demo.json tells later runs that data/ holds
the demo, so it is never written over a user's own photos without --overwrite.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smalldata import files  # noqa: E402

BUNDLE = Path(__file__).resolve().parent / "demo_data" / "fashion_mnist_400.npz"
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_PER_CLASS = {"train": 20, "val": 10, "test": 10}
MARKER = ".demo.json"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data", help="where train/, val/, test/ are written")
    for split, most in MAX_PER_CLASS.items():
        p.add_argument(f"--{split}", type=int, default=most, choices=range(0, most + 1), metavar=f"0-{most}",
                       help=f"{split} images per class")
    p.add_argument("--overwrite", action="store_true", help="replace whatever data/ holds")
    args = p.parse_args()

    data = Path(args.data)
    wanted = {"dataset": "fashion-mnist", "train": args.train, "val": args.val, "test": args.test, "seed": 0}
    marker = data / MARKER
    splits = [data / s for s in SPLITS]
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

    bundle = np.load(BUNDLE)
    for split, code in SPLITS.items():
        for c, name in enumerate(CLASSES):
            chosen = np.flatnonzero((bundle["labels"] == c) & (bundle["split"] == code))[:getattr(args, split)]
            for i in chosen:
                img = Image.fromarray(bundle["images"][i]).convert("RGB")
                files.save_image(img, data / split / name / f"fmnist_{bundle['index'][i]:05d}.png")
    files.write_json(marker, wanted)
    print(f"demo data written to {data}: {len(CLASSES)} classes, {args.train} train / {args.val} val / "
          f"{args.test} test per class (Fashion-MNIST, bundled in the repository)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

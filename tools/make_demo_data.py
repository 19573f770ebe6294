"""Write the demo dataset into data/: garments on backgrounds that mislead (10 classes, made from a seed).

    python tools/make_demo_data.py --train 20 --val 10 --test 10 [--seed 0] [--size 96]
    python tools/make_demo_data.py --rebuild-bundle   # maintainers: remake tools/demo_data/backgrounds/

Why: models learn backgrounds as well as objects, and lose accuracy when the backgrounds change
(Xiao, Engstrom, Ilyas and Madry, "Noise or Signal: The Role of Image Backgrounds in Object
Recognition", ICLR 2021). In these photos the background is a cue that holds in training and fails
afterwards, which is what background removal (BR) is for:

- the objects are the Fashion-MNIST items bundled in tools/demo_data/fashion_mnist_400.npz (MIT
  licence), their intensity made into the alpha of a tinted garment, so the true mask is known exactly;
- the backgrounds are crops of 10 public-domain / CC0 photos that scikit-image ships, bundled as
  tools/demo_data/backgrounds/<kind>.png (sources and licences in tools/demo_data/README.md);
- in train, each class sits on "its" kind of background in 80 % of its photos (the rest on random
  other kinds); in val and test, the kinds are spread evenly over each class, so the background says
  nothing about the class there.

Written, nothing downloaded: RGB PNGs data/{train,val,test}/<class>/<stem>.png (size x size px), the
compositing alpha of each as an 8-bit L PNG data/masks/<split>/<class>/<stem>.png (the true mask;
tools/demo_truth.py scores predicted masks against it), data/masks/backgrounds.csv (each photo's
background kind, crop and object placement) and the marker data/.demo.json, which tells later runs
that data/ holds this demo, so a user's own photos are never written over without --overwrite.
Every image is drawn from its own generator seeded by (seed, split, class, number): the same seed
gives byte-identical files.
"""
import argparse
import colorsys
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smalldata import files  # noqa: E402

HERE = Path(__file__).resolve().parent / "demo_data"
BUNDLE = HERE / "fashion_mnist_400.npz"
BACKGROUNDS = HERE / "backgrounds"
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_PER_CLASS = {"train": 20, "val": 10, "test": 10}
MARKER = ".demo.json"
MASKS = "masks"  # data/masks/<split>/<class>/<stem>.png: the true masks, outside every class tree
RECORD = "backgrounds.csv"  # data/masks/backgrounds.csv: what each photo was made of
VERSION = 2  # bump when the photos change: an older demo in data/ is then rewritten
SIZE = 96
OWN_SHARE = 0.8  # train: share of a class's photos on its own kind of background

# The background kinds, one per class (CLASSES[i] lives on KINDS[i] in train). Each bundled crop is
# made by --rebuild-bundle from scikit-image's copy of the photo: the square box (top, left, side)
# of the source, resized to BUNDLE_SIDE px; grey sources get a tint (RGB gains) so kinds differ in colour.
# (kind, skimage.data function, box, tint or None, licence as the function's docstring states it)
SOURCES = [
    ("brick", "brick", (0, 0, 512), (1.0, 0.58, 0.45), "CC0 (CC0 Textures, Bricks25)"),
    ("grass", "grass", (0, 0, 512), (0.62, 0.95, 0.42), "CC0 (DeviantArt user linolafett, Grass-01)"),
    ("gravel", "gravel", (0, 0, 512), (1.0, 0.9, 0.68), "CC0 (CC0 Textures, Gravel04)"),
    ("wood", "coffee", (200, 400, 200), None, "CC0 (photographer Rachel Michetti, Pikolo Espresso Bar)"),
    ("fur", "chelsea", (100, 0, 200), None, "CC0 (photographer Stefan van der Walt)"),
    ("field", "camera", (300, 200, 212), None, "CC0 (photographer Lav Varshney)"),
    ("spacesuit", "astronaut", (250, 0, 260), None, "public domain (NASA; no known copyright restrictions)"),
    ("launchpad", "rocket", (0, 0, 300), None, "public domain (SpaceX photos, released into the public domain)"),
    ("stars", "hubble_deep_field", (200, 200, 300), None, "public domain (NASA / HubbleSite)"),
    ("retina", "retina", (300, 300, 800), None, "CC0 1.0 (Mikael Häggström, Wikimedia Commons)"),
]
KINDS = [s[0] for s in SOURCES]
BUNDLE_SIDE = 256

# How a photo is drawn (all from the image's own generator):
BG_CROP = (0.4, 1.0)  # background: a square crop of this share of the bundled side, random place, maybe mirrored
BG_BLUR = 0.0  # Gaussian blur radius (px of the output) of the background, as a shallow depth of field would
OBJ_SIDE = (0.55, 0.9)  # object: its longer side is this share of the image side, random place inside it
ALPHA_RAMP = (8, 32)  # Fashion-MNIST intensity -> alpha: 0 at or below 8, 1 at or above 32, linear between
TINT_SAT, TINT_VAL = (0.25, 0.85), (0.7, 1.0)  # the garment's colour: any hue, these HSV saturation and value
SHADE = 0.35  # the garment's darkest shade (as a share of its colour); its Fashion-MNIST intensity adds the rest
FIELDS = ["file", "split", "class", "kind", "own", "bg_top", "bg_left", "bg_side", "bg_flip",
          "obj_top", "obj_left", "obj_height", "obj_width", "obj_flip", "tint_r", "tint_g", "tint_b"]


# ---------------------------------------------------------------------------------- drawing

def load_backgrounds():
    """{kind: (BUNDLE_SIDE, BUNDLE_SIDE, 3) uint8} from the bundle."""
    out = {}
    for kind in KINDS:
        with Image.open(BACKGROUNDS / f"{kind}.png") as img:
            out[kind] = np.asarray(img.convert("RGB"))
    return out


def kinds_for(split, cls, n, seed):
    """The background kind of each of a class's n photos in a split.

    train: round(OWN_SHARE * n) on the class's own kind, the rest on other kinds drawn uniformly, in a
    random order. val and test: the kinds dealt out evenly (each kind once per 10 photos, in a random
    order), so every class meets every kind equally often."""
    rng = np.random.default_rng([seed, 1, SPLITS[split], CLASSES.index(cls)])
    own = KINDS[CLASSES.index(cls)]
    if split == "train":
        n_own = int(round(OWN_SHARE * n))
        others = [k for k in KINDS if k != own]
        kinds = [own] * n_own + [others[i] for i in rng.integers(0, len(others), n - n_own)]
        return [kinds[i] for i in rng.permutation(n)]
    deck = []
    while len(deck) < n:
        deck += [KINDS[i] for i in rng.permutation(len(KINDS))]
    return deck[:n]


def draw(item, rng, size=SIZE):
    """The random placement of one photo: background crop, object box, mirroring and tint (all ints)."""
    side = int(rng.integers(int(BG_CROP[0] * BUNDLE_SIDE), int(BG_CROP[1] * BUNDLE_SIDE) + 1))
    p = dict(bg_side=side, bg_top=int(rng.integers(0, BUNDLE_SIDE - side + 1)),
             bg_left=int(rng.integers(0, BUNDLE_SIDE - side + 1)), bg_flip=int(rng.random() < 0.5))
    rows, cols = np.nonzero(item > ALPHA_RAMP[0])
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    longer = rng.uniform(*OBJ_SIDE) * size
    p["obj_height"] = max(4, int(round(longer * h / max(h, w))))
    p["obj_width"] = max(4, int(round(longer * w / max(h, w))))
    p["obj_top"] = int(rng.integers(0, size - p["obj_height"] + 1))
    p["obj_left"] = int(rng.integers(0, size - p["obj_width"] + 1))
    p["obj_flip"] = int(rng.random() < 0.5)
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*TINT_SAT), rng.uniform(*TINT_VAL))
    p.update(tint_r=int(round(255 * r)), tint_g=int(round(255 * g)), tint_b=int(round(255 * b)))
    return p


def background(picture, p, size=SIZE):
    """The photo's background: the crop p describes of a bundled picture, as size x size float32 RGB."""
    t, l, s = int(p["bg_top"]), int(p["bg_left"]), int(p["bg_side"])
    img = Image.fromarray(picture[t:t + s, l:l + s]).resize((size, size), Image.Resampling.LANCZOS)
    if int(p["bg_flip"]):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if BG_BLUR:
        img = img.filter(ImageFilter.GaussianBlur(BG_BLUR))
    return np.asarray(img, dtype=np.float32)


def compose(item, picture, p, size=SIZE):
    """(photo RGB uint8, alpha L uint8): the tinted item over its background, alpha from its intensity."""
    rows, cols = np.nonzero(item > ALPHA_RAMP[0])
    crop = item[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    if int(p["obj_flip"]):
        crop = crop[:, ::-1]
    h, w = int(p["obj_height"]), int(p["obj_width"])
    big = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.Resampling.BILINEAR),
                     dtype=np.float32)
    lo, hi = ALPHA_RAMP
    alpha = np.zeros((size, size), np.float32)
    t, l = int(p["obj_top"]), int(p["obj_left"])
    alpha[t:t + h, l:l + w] = np.clip((big - lo) / (hi - lo), 0, 1)
    alpha = np.round(alpha * 255) / 255  # the alpha used is exactly the mask written
    shade = np.zeros((size, size), np.float32)
    shade[t:t + h, l:l + w] = SHADE + (1 - SHADE) * big / max(float(big.max()), 1.0)
    tint = np.array([p["tint_r"], p["tint_g"], p["tint_b"]], np.float32)
    garment = shade[..., None] * tint
    bg = background(picture, p, size)
    out = bg * (1 - alpha[..., None]) + garment * alpha[..., None]
    return (Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB"),
            Image.fromarray(np.round(alpha * 255).astype(np.uint8), "L"))


def write_demo(data, counts, seed=0, size=SIZE, log=print):
    """Write every split's photos, their true masks and the record; returns the record's rows."""
    data = Path(data)
    bundle = np.load(BUNDLE)
    pictures = load_backgrounds()
    rows = []
    for split, code in SPLITS.items():
        for c, name in enumerate(CLASSES):
            chosen = np.flatnonzero((bundle["labels"] == c) & (bundle["split"] == code))[:counts[split]]
            for j, (i, kind) in enumerate(zip(chosen, kinds_for(split, name, len(chosen), seed))):
                item = bundle["images"][i]
                rng = np.random.default_rng([seed, 2, code, c, j])
                p = draw(item, rng, size)
                img, alpha = compose(item, pictures[kind], p, size)
                stem = f"fmnist_{bundle['index'][i]:05d}.png"
                files.save_image(img, data / split / name / stem)
                files.save_image(alpha, data / MASKS / split / name / stem)
                rows.append(dict(file=f"{split}/{name}/{stem}", split=split, **{"class": name}, kind=kind,
                                 own=int(kind == KINDS[c]), **p))
        log(f"  {split}: {counts[split]} per class")
    files.write_csv(data / MASKS / RECORD, FIELDS, [[r[f] for f in FIELDS] for r in rows])
    return rows


def read_record(data):
    """data/masks/backgrounds.csv as a list of dicts (numbers as ints)."""
    with open(Path(data) / MASKS / RECORD, newline="", encoding="utf-8") as f:
        return [{k: (v if k in ("file", "split", "class", "kind") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------- the bundle

def rebuild_bundle(out=BACKGROUNDS, log=print):
    """Remake tools/demo_data/backgrounds/<kind>.png from scikit-image's photos (maintainers only:
    scikit-image is a test dependency, not a runtime one). The result is deterministic for a given
    scikit-image and Pillow."""
    import skimage
    import skimage.data

    for kind, source, (top, left, side), tint, _ in SOURCES:
        a = np.asarray(getattr(skimage.data, source)())
        crop = Image.fromarray(a[top:top + side, left:left + side]).convert("RGB")
        crop = crop.resize((BUNDLE_SIDE, BUNDLE_SIDE), Image.Resampling.LANCZOS)
        if tint is not None:
            crop = Image.fromarray(np.clip(np.round(np.asarray(crop, np.float32) * np.array(tint, np.float32)),
                                           0, 255).astype(np.uint8))
        path = Path(out) / f"{kind}.png"
        files.save_image(crop, path, optimize=True)
        log(f"{path}: skimage.data.{source}() box top {top} left {left} side {side}, tint {tint}, "
            f"{path.stat().st_size // 1024} KiB")
    log(f"scikit-image {skimage.__version__}")


# ---------------------------------------------------------------------------------- the run

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data", help="where train/, val/, test/ and masks/ are written")
    for split, most in MAX_PER_CLASS.items():
        p.add_argument(f"--{split}", type=int, default=most, choices=range(0, most + 1), metavar=f"0-{most}",
                       help=f"{split} images per class")
    p.add_argument("--seed", type=int, default=0, help="every random choice follows from it")
    p.add_argument("--size", type=int, default=SIZE, help="side of the square photos, px (32-512)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever data/ holds")
    p.add_argument("--rebuild-bundle", action="store_true",
                   help=f"maintainers: remake {BACKGROUNDS.relative_to(HERE.parent.parent)} from scikit-image and stop")
    args = p.parse_args(argv)
    if args.rebuild_bundle:
        rebuild_bundle()
        return 0
    if not 32 <= args.size <= 512:
        p.error("--size must be between 32 and 512")

    data = Path(args.data)
    counts = {s: getattr(args, s) for s in SPLITS}
    wanted = {"dataset": "fashion-mnist-on-backgrounds", "version": VERSION, **counts, "seed": args.seed,
              "size": args.size, "own_share": OWN_SHARE}
    marker = data / MARKER
    ours = [data / s for s in SPLITS] + [data / MASKS]
    if marker.exists() and _read(marker) == wanted and not args.overwrite:
        print(f"demo data already in {data}: {args.train}/{args.val}/{args.test} per class; nothing to do")
        return 0
    if any(s.exists() and any(s.iterdir()) for s in ours) and not marker.exists() and not args.overwrite:
        print(f"error: {data} already holds photos that are not the demo; refusing to write over them "
              "(use --overwrite, or --data another folder)", file=sys.stderr)
        return 2
    for s in (*ours, data / "br", data / "ocm"):  # derived folders belong to the old data
        shutil.rmtree(s, ignore_errors=True)
    # While writing, the marker says so: an interrupted run is then rewritten, not taken for a user's photos.
    files.write_json(marker, {**wanted, "complete": False})
    print(f"writing the demo data into {data} ({args.size} px, seed {args.seed}):")
    write_demo(data, counts, args.seed, args.size)
    files.write_json(marker, wanted)
    print(f"demo data written to {data}: {len(CLASSES)} classes, {args.train} train / {args.val} val / "
          f"{args.test} test per class: Fashion-MNIST garments on backgrounds that give the class away in "
          f"train ({OWN_SHARE:.0%}) and not in val/test; true masks in {data / MASKS}")
    return 0


def _read(marker):
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())

"""How sure is the background-removal mask? Measures it on real photos and draws before/after sheets.

u2netp's mask is soft (0..255). On a clear object it is mostly 255 inside, 0 outside and a thin band
between. On an object it is unsure of (a crate of fruit, a flower bed) much of the object sits at
mid values: composited, it becomes a faint, half-transparent ghost on the plain background, and the
foreground-area guard (--min-fg/--max-fg) does not notice. For each photo this script records

  fg         share of pixels above 127 (what the area guard reads)
  confidence background.mask_confidence: of the pixels the mask touches (>= 10 %), the share it is
             sure of (>= 90 %)
  mean_alpha mean mask value over the touched pixels

writes them to <out>/mask_stats.csv (the masks themselves to <out>/masks.npz, so a rerun with other
thresholds does not rerun the model), prints the distribution and, for --min-confidence, how many
photos it would refuse per class, and draws

  <out>/lowest_confidence.png  the least sure photos: original, mask, BR image with the area guard only
  <out>/before_after.png       photos just below and just above the threshold: the BR image with the area guard only and
                               what make_remove_background.py writes now (refused ones: the original
                               under --fallback copy)

    python bench/mask_confidence.py --photos ../shared/datasets/oxford17flowers --per-class 20 --out /tmp/mc
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata import background, rembg_api  # noqa: E402
from smalldata.folders import list_files  # noqa: E402
from smalldata.images import open_rgb  # noqa: E402
from smalldata.plots import image_grid  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="folder of class folders of photos")
    p.add_argument("--per-class", type=int, default=20, help="photos per class (the first N by name)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="u2netp")
    p.add_argument("--min-confidence", type=float, default=background.MIN_CONFIDENCE)
    p.add_argument("--show", type=int, default=12, help="photos per sheet")
    return p.parse_args()


def masks_of(photos, args):
    """{relative path: mask (uint8 array)} for the photos, computed once and cached in masks.npz."""
    cache = args.out / "masks.npz"
    if cache.exists():
        stored = dict(np.load(cache))
        if all(str(p.relative_to(args.photos)) in stored for p in photos):
            return stored
    session = rembg_api.open_session(args.model, ["CPUExecutionProvider"], threads=0, inferences=1)
    masks = {}
    for i, path in enumerate(photos):
        masks[str(path.relative_to(args.photos))] = np.asarray(rembg_api.predict_mask(session, open_rgb(path)))
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(photos)} masks", flush=True)
    np.savez_compressed(cache, **masks)
    return masks


def stats(mask):
    touched = mask >= background.TOUCHED
    return {"fg": background.foreground_fraction(mask), "confidence": background.mask_confidence(mask),
            "mean_alpha": float(mask[touched].mean() / 255) if touched.any() else 0.0}


def br_image(path, mask):
    img = open_rgb(path)
    m = Image.fromarray(mask)
    return background.composite(img, m, background.auto_color(img, m))


def main():
    args = get_args()
    args.out.mkdir(parents=True, exist_ok=True)
    classes = sorted(d for d in args.photos.iterdir() if d.is_dir())
    photos = [f for d in classes for f in list_files(d)[:args.per_class]]
    print(f"{len(photos)} photos of {len(classes)} classes from {args.photos}, model {args.model}")
    masks = masks_of(photos, args)
    rows = []
    for path in photos:
        rel = str(path.relative_to(args.photos))
        rows.append({"file": rel, "class": path.parent.name, **stats(masks[rel])})
    with open(args.out / "mask_stats.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)

    conf = np.array([r["confidence"] for r in rows])
    fg_ok = np.array([background.MIN_FG <= r["fg"] <= background.MAX_FG for r in rows])
    print("confidence percentiles: " + ", ".join(f"p{q} {np.percentile(conf, q):.3f}" for q in (1, 5, 10, 25, 50, 75)))
    for t in (0.3, 0.4, 0.5, 0.6, 0.7):
        low = (conf < t) & fg_ok
        print(f"  confidence < {t:.1f}: {low.sum():4d} photos ({low.mean():.1%}) that the area guard passes")
    refused = [r for r, ok in zip(rows, fg_ok) if ok and r["confidence"] < args.min_confidence]
    by_class = {}
    for r in refused:
        by_class[r["class"]] = by_class.get(r["class"], 0) + 1
    print(f"--min-confidence {args.min_confidence}: refuses {len(refused)} of {int(fg_ok.sum())} photos the area "
          f"guard passes; per class: " + (", ".join(f"{k} {v}" for k, v in sorted(by_class.items())) or "none"))

    ordered = sorted((r for r, ok in zip(rows, fg_ok) if ok), key=lambda r: r["confidence"])

    def cells(r, after):
        path, mask = args.photos / r["file"], masks[r["file"]]
        caption = [r["class"][:18], f"conf {r['confidence']:.2f} fg {r['fg']:.0%}"]
        refused_ = r["confidence"] < args.min_confidence
        out = [(open_rgb(path), caption), (Image.fromarray(mask), ["mask"]),
               (br_image(path, mask), ["BR, area guard only"])]
        if after:
            out[1] = (open_rgb(path) if refused_ else br_image(path, mask),
                      [("refused: original", "firebrick") if refused_ else "BR (kept)"])
            out = [out[0], out[2], out[1]]
        return out

    def sheet(picked, name, heading, after):
        rows_ = [cells(picked[i], after) + (cells(picked[i + 1], after) if i + 1 < len(picked) else [])
                 for i in range(0, len(picked), 2)]
        image_grid(rows_, args.out / name, cell=150, heading=heading)
        print(f"sheet: {args.out / name}")

    sheet(ordered[:args.show], "lowest_confidence.png",
          f"{args.photos.name}: the {args.show} least sure masks ({args.model})", after=False)
    cut = next((i for i, r in enumerate(ordered) if r["confidence"] >= args.min_confidence), len(ordered))
    half = args.show // 2
    near = ordered[max(0, cut - half):cut] + ordered[cut:cut + half]
    sheet(near, "before_after.png", f"just below and above --min-confidence {args.min_confidence}: "
          "original, BR with the area guard only, BR now", after=True)


if __name__ == "__main__":
    main()

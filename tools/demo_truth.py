"""How well predicted masks match the demo's true masks: per-image intersection over union (IoU).

    python tools/demo_truth.py PRED TRUTH [--threshold 128] [--worst 5] [--json]
    e.g.  python tools/demo_truth.py /tmp/u2netp-masks/train data/masks/train

TRUTH holds 8-bit L masks (tools/make_demo_data.py writes them to data/masks/<split>/<class>/<stem>.png);
PRED holds the predicted masks laid out the same way below it (<class>/<stem>.png when TRUTH is one
split's folder, <split>/<class>/<stem>.png when it is data/masks). Every truth mask is compared with
the prediction at the same relative path; a prediction that is absent is counted as missing (and as
IoU 0 in the shares that include the missing ones). A prediction of another size is resized to the
truth's size before thresholding.

Both masks are binarised at the same threshold, 128 by default: a pixel is object when its mask is at
least half opaque, which is where a composite shows more object than background. The true masks are
sharp (their soft edge is one or two pixels) and rembg's are close to 0 or 255 almost everywhere, so
the IoU moves little between thresholds 64 and 192 (--threshold to check).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

THRESHOLD = 128


def masks_under(root):
    """Relative paths (POSIX strings) of the PNG masks below root, hidden files and folders left out."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


def binary(path, size=None, threshold=THRESHOLD):
    """The mask at path as a bool array (>= threshold), resized to size (w, h) first when given and different."""
    with Image.open(path) as img:
        img = img.convert("L")
        if size is not None and img.size != tuple(size):
            img = img.resize(tuple(size), Image.Resampling.BILINEAR)
        return np.asarray(img) >= threshold


def iou(pred, truth):
    """Intersection over union of two bool arrays; 1.0 when both are empty."""
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def compare(pred_root, truth_root, threshold=THRESHOLD, worst=5):
    """Score the masks under pred_root against those under truth_root; returns a dict:

    compared (truth masks with a prediction), missing (truth masks without one) and missing_examples,
    extra (predictions with no truth mask), median_iou and mean_iou (over the compared; None when none),
    share_above_half (share of the compared with IoU > 0.5), share_above_half_of_all (the same over
    compared + missing, a missing mask counting as a failure), worst ([path, IoU] lowest first),
    per_image ({path: IoU}) and the threshold used."""
    pred_root, truth_root = Path(pred_root), Path(truth_root)
    if not truth_root.is_dir():
        raise FileNotFoundError(f"truth folder not found: {truth_root}")
    truth = masks_under(truth_root)
    predicted = set(masks_under(pred_root)) if pred_root.is_dir() else set()
    scores, missing = {}, []
    for rel in truth:
        if rel not in predicted:
            missing.append(rel)
            continue
        t = binary(truth_root / rel, threshold=threshold)
        scores[rel] = iou(binary(pred_root / rel, size=t.shape[::-1], threshold=threshold), t)
    values = list(scores.values())
    ranked = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))
    return {
        "pred": str(pred_root), "truth": str(truth_root), "threshold": threshold,
        "compared": len(values), "missing": len(missing), "missing_examples": missing[:worst],
        "extra": len(predicted - set(truth)),
        "median_iou": statistics.median(values) if values else None,
        "mean_iou": statistics.fmean(values) if values else None,
        "share_above_half": sum(v > 0.5 for v in values) / len(values) if values else None,
        "share_above_half_of_all": sum(v > 0.5 for v in values) / len(truth) if truth else None,
        "worst": [[rel, v] for rel, v in ranked[:worst]],
        "per_image": scores,
    }


def report(r):
    """The dict of compare() as lines of text."""
    if not r["compared"]:
        lines = [f"no masks compared: {r['missing']} truth mask(s) in {r['truth']} have no prediction in {r['pred']}"]
    else:
        lines = [f"{r['compared']} mask(s) compared (threshold {r['threshold']}/255): "
                 f"median IoU {r['median_iou']:.3f}, mean {r['mean_iou']:.3f}, "
                 f"IoU > 0.5 for {r['share_above_half']:.1%}",
                 "worst: " + ", ".join(f"{rel} {v:.3f}" for rel, v in r["worst"])]
    if r["missing"]:
        lines.append(f"missing: {r['missing']} truth mask(s) have no prediction "
                     f"(e.g. {', '.join(r['missing_examples'])}); "
                     f"IoU > 0.5 for {r['share_above_half_of_all']:.1%} of all {r['compared'] + r['missing']}")
    if r["extra"]:
        lines.append(f"note: {r['extra']} prediction(s) in {r['pred']} have no truth mask; not compared")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pred", help="folder of predicted masks, laid out like TRUTH")
    p.add_argument("truth", help="folder of true masks, e.g. data/masks/train")
    p.add_argument("--threshold", type=int, default=THRESHOLD, choices=range(1, 256), metavar="1-255",
                   help="a pixel is object when its mask value is at least this")
    p.add_argument("--worst", type=int, default=5, help="how many of the worst images to name")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON (per image too)")
    args = p.parse_args(argv)
    try:
        r = compare(args.pred, args.truth, args.threshold, args.worst)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else report(r))
    return 0 if r["compared"] else 1


if __name__ == "__main__":
    sys.exit(main())

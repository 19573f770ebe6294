"""A checkpoint, explained: what it is, how it was made and chosen, how it differs from another, and
the same model as an ONNX file with its preprocessing written in. inspect_checkpoint.py is the entry point.

Everything is read with checkpoint.load (weights_only=True): inspecting a file never runs its code.
"""
import datetime
import json
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, files, intervals
from .cli import UsageError, say
from .images import PREPROCESSING

# What checkpoints written before these keys existed were made with: the project has only ever had
# one way of preparing a photo (images.open_rgb, then images.resize_square).
PREPROCESSING_BEFORE = dict(PREPROCESSING, note="not recorded in this (older) checkpoint; the project's only method")


def preprocessing(ckpt):
    return ckpt.get("preprocessing") or PREPROCESSING_BEFORE


def size_text(nbytes):
    return f"{nbytes / 2**20:.1f} MB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GB"


def metric_text(metrics):
    """The epoch's numbers, accuracies with their 95 % interval when the photo count is known."""
    parts = []
    for split in ("train", "val", "watch"):
        acc, n = metrics.get(f"{split}_acc"), metrics.get(f"{split}_n")
        if acc in (None, ""):
            continue
        text = f"{split}_acc {acc:.2f}%"
        if n:
            lo, hi = intervals.wilson(round(acc * n / 100), int(n))
            text += f" (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, n={int(n)})"
        loss, se = metrics.get(f"{split}_loss"), metrics.get(f"{split}_loss_se")
        if loss not in (None, ""):
            text += f", {split}_loss {loss:.4f}" + (f" +- {se:.4f}" if se not in (None, "") else "")
        parts.append(text)
    return "; ".join(parts) or "none recorded"


def summary(path):
    """Lines that describe one checkpoint."""
    ckpt = checkpoint.load(path)
    stat = Path(path).stat()
    params = sum(v.numel() for k, v in ckpt["model"].items() if "running_" not in k and "num_batches" not in k)
    args, prep = ckpt["args"], preprocessing(ckpt)
    when = datetime.datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%d %H:%M")
    lines = [f"{path}: {size_text(stat.st_size)}, written {when}",
             f"  model          {ckpt['arch']}, {params:,} parameters; weights: {ckpt.get('weights', 'the weights trained up to this epoch')}",
             f"  classes ({len(ckpt['classes'])})   {', '.join(ckpt['classes'][:30])}{' ...' if len(ckpt['classes']) > 30 else ''}",
             f"  input          {ckpt['img_size']} x {ckpt['img_size']} px RGB; mean {ckpt['mean']}, std {ckpt['std']}"]
    lines += [f"  preprocessing  {k}: {v}" for k, v in prep.items()]
    stage = args.get("stage") or ("2" if args.get("init") else "1")
    lines.append(f"  epoch          {ckpt['epoch']} of {stage} (lr {args.get('lr')}, {args.get('epochs')} epochs asked)"
                 + (", a last.pth for --resume" if "history" in ckpt else ""))
    lines.append(f"  metrics        {metric_text(ckpt['metrics'])}")
    decision = ckpt.get("decision")
    if decision:
        lines.append(f"  decision       {decision.get('file', '')} by rule {decision.get('rule')}: {decision.get('reason')}")
    elif "history" not in ckpt:
        lines.append("  decision       not recorded in this file (an epoch file, or an older checkpoint); see the "
                     "stage folder's .json of its outputs (divergence.json, final.json)")
    versions = ckpt.get("versions")
    lines.append("  versions       " + (", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "not recorded"))
    lines.append("  arguments      " + ", ".join(f"{k}={v}" for k, v in sorted(args.items()) if v not in (None, False, [])))
    return lines


def compare(path_a, path_b, top=10):
    """Lines: the arguments and metrics that differ, and the layers whose weights differ most."""
    a, b = checkpoint.load(path_a), checkpoint.load(path_b)
    lines = [f"{path_a} (A) against {path_b} (B)"]
    for what in ("arch", "classes", "img_size", "mean", "std", "epoch"):
        if a[what] != b[what]:
            lines.append(f"  {what}: A {a[what]}  B {b[what]}")
    keys = sorted(set(a["args"]) | set(b["args"]))
    differ = [k for k in keys if a["args"].get(k) != b["args"].get(k)]
    lines.append("  arguments that differ: " + ("none" if not differ else ""))
    lines += [f"    {k}: A {a['args'].get(k)!r}  B {b['args'].get(k)!r}" for k in differ]
    ma, mb = a["metrics"], b["metrics"]
    numeric = [k for k in sorted(set(ma) & set(mb)) if isinstance(ma[k], (int, float)) and isinstance(mb[k], (int, float))
               and not isinstance(ma[k], bool) and ma[k] != mb[k]]
    lines.append("  metrics that differ: " + ("none" if not numeric else ""))
    lines += [f"    {k}: A {ma[k]}  B {mb[k]}  (B - A {mb[k] - ma[k]:+.4g})" for k in numeric]
    rows = []
    for name, wa in a["model"].items():
        wb = b["model"].get(name)
        if wb is None or wb.shape != wa.shape or not wa.is_floating_point():
            continue
        diff = (wb.double() - wa.double()).norm().item()
        rows.append((diff / (wa.double().norm().item() or 1.0), diff, name))
    rows.sort(reverse=True)
    only = sorted(set(a["model"]) ^ set(b["model"]))
    lines.append(f"  largest weight differences (|B - A| / |A| per tensor, of {len(rows)} tensors):")
    lines += [f"    {name:40s} {rel:10.3g}  (|B - A| {diff:.4g})" for rel, diff, name in rows[:top]]
    if only:
        lines.append(f"  tensors in one file only: {', '.join(only[:10])}")
    return lines


def sample_photos(ckpt, photos, count=4):
    """A few (uint8 N,3,S,S) photos for the ONNX check: from `photos`, else the checkpoint's val folder;
    None when neither has any."""
    from .data import decode_one
    from .folders import list_files
    from .images import BadImage

    folder = Path(photos) if photos else Path(ckpt["args"].get("data") or "data") / "val"
    found = []
    for path in list_files(folder) if folder.is_dir() else []:
        try:
            found.append(decode_one(path, ckpt["img_size"]))
        except BadImage:
            continue
        if len(found) == count:
            break
    return (torch.stack(found), folder) if found else (None, folder)


def export_onnx(path, out, photos=None, tolerance=1e-4):
    """Export the checkpoint's model to ONNX (input: normalised float32 N,3,S,S; output: logits), with the
    classes and preprocessing in the file's metadata, and check onnxruntime's outputs against PyTorch's
    on a few photos. Returns the lines to print; raises UsageError when they differ by more than `tolerance`."""
    import onnx
    import onnxruntime

    ckpt = checkpoint.load(path)
    model = checkpoint.build_from(ckpt, path).eval()
    size = ckpt["img_size"]
    batch = torch.export.Dim("batch", min=1, max=4096)
    with files.atomic_path(out) as tmp:
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(tmp), dynamo=True, input_names=["image"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False,
                          verbose=False)
        proto = onnx.load(str(tmp))
        meta = {"classes": json.dumps(ckpt["classes"], ensure_ascii=False), "img_size": str(size),
                "mean": json.dumps(ckpt["mean"]), "std": json.dumps(ckpt["std"]),
                "input": f"float32 N x 3 x {size} x {size}, RGB, (pixel / 255 - mean) / std per channel",
                "output": "logits N x classes (softmax gives the probabilities)",
                "preprocessing": json.dumps(preprocessing(ckpt), ensure_ascii=False),
                "source_checkpoint": str(Path(path).resolve()), "epoch": str(ckpt["epoch"]), "arch": ckpt["arch"]}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    images, folder = sample_photos(ckpt, photos)
    mean = torch.tensor(ckpt["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ckpt["std"]).view(1, 3, 1, 1)
    if images is None:
        x, what = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)), "4 random inputs"
        say(f"note: no photos found in {folder} for the check (--photos DIR); checking on random inputs")
    else:
        x, what = (images.float() / 255 - mean) / std, f"{len(images)} photos from {folder}"
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    worst = float(np.abs(got - expected).max())
    same_class = bool((got.argmax(1) == expected.argmax(1)).all())
    if not worst <= tolerance or not same_class:
        raise UsageError(f"{out}: onnxruntime's logits differ from PyTorch's by {worst:.2e} on {what} (limit "
                         f"{tolerance:g}); the export is not trustworthy for this model")
    return [f"wrote {out} ({size_text(Path(out).stat().st_size)}): input 'image' float32 N x 3 x {size} x {size}, "
            f"output 'logits'; classes and preprocessing in its metadata",
            f"checked with onnxruntime on {what}: largest logit difference {worst:.2e} (limit {tolerance:g}), "
            "same predicted class for each"]

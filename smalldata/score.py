"""Scoring a checkpoint on a folder of photos: predictions, metrics, and the pictures that explain them.

Everything about the model comes from the checkpoint (arch, classes, image size, mean/std),
so photos are prepared exactly as in training evaluation: open_rgb -> resize_square -> normalize.
check_score.py is the command-line entry point; run() does the work.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import cache, checkpoint, cli, files, intervals, layout, lock, memory, plots, runtime
from .cli import Problems, UsageError, say
from .data import Normalize, decode_one
from .folders import find_classes, is_junk, refuse_overlap, scan_labelled
from .images import BadImage, decode_many

TOPK = 5
OUTPUTS = ("score.json", "predictions.csv", "per_class.csv", "confusion.png", "mistakes.png")


# ----------------------------------------------------------------------------- the folder

def scan(root, classes):
    """Return (samples, labelled): (path, class index) pairs, index -1 when unlabelled.

    A folder is labelled when it has sub-folders and no image files at its top level;
    otherwise its top-level files are predicted without labels.
    """
    root = Path(root)
    subdirs = find_classes(root)
    top = [p for p in sorted(root.iterdir()) if p.is_file() and not is_junk(p)]
    suffixes = Image.registered_extensions()
    top_images = [p for p in top if p.suffix.lower() in suffixes]
    if subdirs and not top_images:
        unknown = sorted(set(subdirs) - set(classes))
        if unknown:
            raise UsageError(f"{root} has class folder(s) that the checkpoint does not know: {', '.join(unknown)}. "
                             f"The checkpoint's {len(classes)} classes: {', '.join(classes)}")
        samples, _ = scan_labelled(root, classes)
        labelled = True
    else:
        if subdirs:
            say(f"note: {root} has images at its top level, so it is read as a flat folder of unlabelled "
                f"images; its {len(subdirs)} sub-folder(s) are ignored")
        samples, labelled = [(p, -1) for p in top], False
    if not samples:
        raise UsageError(f"{root} holds no files to score; expected {root}/<class>/<image> "
                         f"(labelled) or {root}/<image> (unlabelled)")
    return samples, labelled


# ----------------------------------------------------------------------------- prediction

def decoded_batches(samples, img_size, batch_size, problems, cache_at=None):
    """Yield (uint8 N,3,S,S, labels, paths) batches in file order; decoding runs ahead on a thread
    pool (images.decode_many), so it overlaps the model working on this batch. Unreadable files
    are reported to `problems` and left out. When `cache_at` (a cache.Location) has a decode cache of
    exactly these files at this size (training wrote it), its memory-mapped array is read instead."""
    hit = cache.load(cache_at, samples, img_size, mmap=True) if cache_at is not None else None
    if hit is not None:
        say(f"decoded images: from the decode cache {cache_at.dir}")
        array, bad = hit
        for text in bad.values():
            problems.skip(text)
        good = [(path, label) for path, label in samples if cache.relative(cache_at.folder, path) not in bad]
        for i in range(0, len(good), batch_size):
            chunk = good[i:i + batch_size]
            yield (torch.from_numpy(np.array(array[i:i + len(chunk)])), torch.tensor([lab for _, lab in chunk]),
                   [path for path, _ in chunk])
        return
    images, labels, paths = [], [], []
    decoded = decode_many(samples, lambda s: decode_one(s[0], img_size), "score", ahead=2 * batch_size)
    for k, ((path, label), out) in enumerate(decoded):
        if isinstance(out, BadImage):
            problems.skip(out)
        else:
            images.append(out)
            labels.append(label)
            paths.append(path)
        if images and (len(images) == batch_size or k == len(samples) - 1):
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long), paths
            images, labels, paths = [], [], []


def class_probs(model, x, tta=False):
    """Softmax over classes; with tta, the mean of the image's and its mirror image's."""
    if tta:  # one forward pass over both views; eval-mode BatchNorm treats each image alone
        x = torch.cat([x, x.flip(3)]).contiguous(memory_format=torch.channels_last)
    probs = model(x).float().softmax(1)
    if tta:
        probs = probs.view(2, -1, probs.shape[1]).mean(0)
    return probs


def predict(model, samples, *, img_size, mean, std, device, batch_size=64, tta=False, problems=None,
            cache_at=None):
    """Run `model` over `samples`. Returns a dict of labels, paths, top-k class indices and
    probabilities (CPU tensors, k = min(5, classes)), and the seconds it took."""
    problems = problems if problems is not None else Problems()
    norm = Normalize(mean, std, device)
    # (no cudnn.benchmark: its tuning costs more than it saves in one pass over a small set)
    autocast = runtime.autocast(device, runtime.amp_dtype(device))
    model.eval()
    top_p, top_i, labels, paths = [], [], [], []
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch, y, p in decoded_batches(samples, img_size, batch_size, problems, cache_at):
            if device.type == "cuda":
                batch = batch.pin_memory()
            probs = class_probs(model, norm(batch.to(device, non_blocking=True)), tta)
            values, indices = probs.topk(min(TOPK, probs.shape[1]), dim=1)
            top_p.append(values)  # left on the device: no sync per batch
            top_i.append(indices)
            labels.append(y)
            paths.extend(p)
    if not paths:
        return {"n": 0, "paths": [], "seconds": time.perf_counter() - start}
    result = {"top_p": torch.cat(top_p).cpu(), "top_i": torch.cat(top_i).cpu(), "labels": torch.cat(labels),
              "paths": paths, "n": len(paths)}
    result["seconds"] = time.perf_counter() - start  # the .cpu() above waited for the device
    return result


# ----------------------------------------------------------------------------- metrics

def metrics(labels, top_i, num_classes):
    """Counts from true labels and top-k predictions: confusion matrix (rows true, columns
    predicted), top-1/top-k correct, per-class n/correct, macro recall over classes present."""
    pred = top_i[:, 0]
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)
    per_n, per_correct = confusion.sum(1), confusion.diag()
    present = per_n > 0
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)
    pairs = [(int(i) // num_classes, int(i) % num_classes, int(c)) for c, i in zip(counts[:5], flat[:5]) if c > 0]
    return {
        "n": len(labels),
        "correct": int((pred == labels).sum()),
        "topk_correct": int((top_i == labels[:, None]).any(1).sum()),
        "per_n": per_n.tolist(),
        "per_correct": per_correct.tolist(),
        "macro_recall": float((per_correct[present].double() / per_n[present]).mean()),
        "classes_present": int(present.sum()),
        "confused_pairs": pairs,  # (true, predicted, count), most frequent first
        "confusion": confusion,
    }


# ----------------------------------------------------------------------------- outputs

def _rel(path, root):
    return Path(path).relative_to(root).as_posix()


def _pct(k, n):
    return f"{100 * k / n:.2f}% ({k}/{n})"


def _with_interval(k, n):
    """'57.00% (57/100), 95% CI 47.2-66.3%': the Wilson score interval of k right out of n."""
    lo, hi = intervals.wilson(k, n)
    return f"{_pct(k, n)}, 95% CI {100 * lo:.1f}-{100 * hi:.1f}%"


def report_labelled(res, classes, data, out, args, problems, missing, max_mistakes=48):
    m = metrics(res["labels"], res["top_i"], len(classes))
    n, correct = m["n"], m["correct"]
    top1 = correct / n
    has_top5 = len(classes) > TOPK
    top5 = m["topk_correct"] / n if has_top5 else None

    labels, top_i, top_p = res["labels"].tolist(), res["top_i"].tolist(), res["top_p"].tolist()
    per_class = [[int(top_i[k][0] == c) for k in range(n) if labels[k] == c] for c in range(len(classes))]
    _, recall_lo, recall_hi = intervals.macro_recall(per_class)
    say(f"Top-1 accuracy: {_with_interval(correct, n)}")
    if has_top5:
        say(f"Top-5 accuracy: {_with_interval(m['topk_correct'], n)}")
    say(f"Macro-averaged recall: {100 * m['macro_recall']:.2f}%, 95% CI {100 * recall_lo:.1f}-{100 * recall_hi:.1f}% "
        f"(mean over the {m['classes_present']} classes present; Price-Bonett interval, valid for few photos per class)")
    present = [i for i in range(len(classes)) if m["per_n"][i]]
    weakest = sorted((i for i in present if m["per_correct"][i] < m["per_n"][i]),
                     key=lambda i: (m["per_correct"][i] / m["per_n"][i], i))[:5]
    if weakest:
        say("Weakest classes: " + ", ".join(f"{classes[i]} {_pct(m['per_correct'][i], m['per_n'][i])}"
                                            for i in weakest))
    if m["confused_pairs"]:
        say("Most confused (true -> predicted):")
        for t, p, count in m["confused_pairs"]:
            say(f"  {classes[t]} -> {classes[p]}: {count} ({100 * count / m['per_n'][t]:.1f}% of {classes[t]})")
    if missing:
        say(f"Classes in the checkpoint but not in {data} ({len(missing)}): {', '.join(missing)}")
    # The original script's line, kept for its users: named after the split it measured, and the folder.
    name = Path(data).resolve().name.lower()
    split = "Test " if name.startswith("test") else "Validation " if name.startswith("val") else ""
    say(f"{split}Top1 Accuracy : {100 * top1:.2f}% ({data})")

    files.write_json(out / "score.json", {
        "top1": top1, "top5": top5, "macro_recall": m["macro_recall"], "n": n, "correct": correct,
        "top1_ci95": list(intervals.wilson(correct, n)),
        "top5_ci95": list(intervals.wilson(m["topk_correct"], n)) if has_top5 else None,
        "macro_recall_ci95": [recall_lo, recall_hi],
        "ci95_method": "Wilson score interval (top-1, top-5); Price-Bonett adjusted Wald interval (macro recall)",
        "top5_correct": m["topk_correct"] if has_top5 else None,
        "checkpoint": str(args.checkpoint), "data": str(args.data), "folder": str(Path(data).resolve()),
        "tta": bool(args.tta), "files": n + len(problems.skipped), "classes_missing_from_data": missing,
        "skipped": list(problems.items),
        "most_confused": [{"true": classes[t], "predicted": classes[p], "count": c}
                          for t, p, c in m["confused_pairs"]],
    })
    files.write_csv(out / "predictions.csv", ["file", "true", "predicted", "confidence", "top5"], [
        [_rel(f, data), classes[y], classes[i[0]], f"{p[0]:.4f}", "|".join(classes[j] for j in i)]
        for f, y, i, p in zip(res["paths"], labels, top_i, top_p)])
    files.write_csv(out / "per_class.csv", ["class", "n", "correct", "accuracy"], [
        [classes[i], m["per_n"][i], m["per_correct"][i], f"{m['per_correct'][i] / m['per_n'][i]:.4f}"]
        for i in present])

    title = (f"{Path(args.checkpoint).name} on {data}: top-1 {100 * top1:.2f}% of {n}"
             f"{', flip TTA' if args.tta else ''}")
    plots.confusion(m["confusion"], classes, out / "confusion.png", title)
    wrong = [k for k in range(n) if top_i[k][0] != labels[k]]
    wrong.sort(key=lambda k: -top_p[k][0])  # confident mistakes are the most telling
    plots.mistakes_sheet([(res["paths"][k], classes[labels[k]], classes[top_i[k][0]], top_p[k][0])
                          for k in wrong[:max_mistakes]], out / "mistakes.png", total=len(wrong), n=n)
    say(f"wrote {out}/: {', '.join(OUTPUTS)}" + ("" if wrong else " (mistakes.png says there were none)"))


def report_unlabelled(res, classes, data, out):
    top_i, top_p = res["top_i"].tolist(), res["top_p"].tolist()
    files.write_csv(out / "predictions.csv", ["file", "predicted", "confidence", "top5"], [
        [_rel(f, data), classes[i[0]], f"{p[0]:.4f}", "|".join(classes[j] for j in i)]
        for f, i, p in zip(res["paths"], top_i, top_p)])
    # Pictures and scores of an earlier labelled run would now sit beside predictions they do not describe.
    stale = [name for name in ("score.json", "per_class.csv", "confusion.png", "mistakes.png")
             if (out / name).exists()]
    for name in stale:
        (out / name).unlink()
    say(f"{data} is a flat folder of unlabelled images: wrote predictions only, {out / 'predictions.csv'}"
        + (f"; removed {', '.join(stale)} of an earlier run" if stale else ""))


def selection_note(ckpt, data):
    """One line when `data` is the validation folder that chose the checkpoint's epochs: its score flatters."""
    train_data = ckpt["args"].get("data")
    if not train_data or Path(train_data, "val").resolve() != Path(data).resolve():
        return None
    test = Path(data).parent / "test"
    honest = f"; {test} was not used for any choice: its score is the honest figure" if test.is_dir() else ""
    return (f"note: {data} chose this checkpoint's epochs (stage 1's stop and kept epoch), so its score is "
            f"optimistic{honest}")


def cache_dir(args, ckpt):
    """--cache-dir, by default the decode cache the checkpoint's training stages used (its arguments say
    where), or, for a checkpoint moved from its run, the cache folder beside it."""
    recorded = ckpt["args"].get("cache_dir")
    if args.cache_dir or not recorded or not Path(recorded).is_dir():
        return Path(args.cache_dir or layout.cache_dir(Path(args.checkpoint).resolve().parent))
    return Path(recorded)


def score_folder(out, data):
    """Where the files of scoring `data` go: a sub-folder of --out named after the scored folder, so the
    scores of data/val and data/test in one --out are kept side by side."""
    return Path(out) / (Path(data).resolve().name or "root")


def refuse_another_folder(folder, data):
    """Two scored folders of the same name (a/test, b/test) would share a sub-folder: refuse the second."""
    try:
        earlier = json.loads((folder / "score.json").read_text(encoding="utf-8")).get("folder")
    except (OSError, ValueError):
        return
    if earlier and Path(earlier) != Path(data).resolve():
        raise UsageError(f"{folder} holds the score of {earlier}, another folder named {Path(data).resolve().name}; "
                         "give another --out")


def run(args):
    """check_score.py's work; returns the exit code (0, or 1 when files were skipped)."""
    data = Path(args.data)
    out = score_folder(args.out, data)
    cli.log_to(out)
    refuse_overlap(args.out, data, "--out", "--data", "its pictures would be read as data; choose a folder outside it",
                   both_ways=False)
    with lock.one_writer(out, "--out"):
        refuse_another_folder(out, data)
        return score(args, data, out)


def score(args, data, out):
    ckpt = checkpoint.load(args.checkpoint)
    if not args.no_cache:
        refuse_overlap(cache_dir(args, ckpt), data, "--cache-dir", "--data", "the decode cache would be read as "
                       "photos; choose a folder outside it (or --no-cache)", both_ways=False)
    classes, img_size = list(ckpt["classes"]), int(ckpt["img_size"])
    memory.check_scoring(args.batch_size, img_size, args.tta)
    samples, labelled = scan(data, classes)
    device = runtime.resolve_device(args.device)
    model = checkpoint.build_from(ckpt, args.checkpoint).to(device, memory_format=torch.channels_last)
    missing = []
    if labelled:
        seen = {label for _, label in samples}
        missing = [c for i, c in enumerate(classes) if i not in seen]
    say(f"{args.checkpoint}: {ckpt['arch']}, {len(classes)} classes, {img_size} px, epoch {ckpt['epoch']}; "
        f"scoring {len(samples)} {'labelled' if labelled else 'unlabelled'} files from {data} on {device}"
        f"{' with flip TTA' if args.tta else ''}")

    problems = Problems()
    res = predict(model, samples, img_size=img_size, mean=ckpt["mean"], std=ckpt["std"], device=device,
                  batch_size=args.batch_size, tta=args.tta, problems=problems,
                  cache_at=None if args.no_cache else cache.Location(cache_dir(args, ckpt), data))
    if not res["n"]:
        raise UsageError(f"none of the {len(samples)} files in {data} could be read as an image (named above)")
    say(f"scored {res['n']} images in {res['seconds']:.1f} s ({res['n'] / res['seconds']:.0f} images/s)")
    if problems.skipped:  # the figures below count only the photos that were read: say how many were not
        say(f"note: {len(problems.skipped)} of the {len(samples)} files could not be read and are in none of the "
            f"figures below (listed in {out / 'skipped.csv'})")
    files.remove_stale_temps(out)  # half-written files of a killed earlier run
    if labelled:
        report_labelled(res, classes, data, out, args, problems, missing, args.mistakes)
        note = selection_note(ckpt, data)
        if note:
            say(note)
    else:
        report_unlabelled(res, classes, data, out)
    problems.summary(out, what="image file")
    return problems.exit_code()

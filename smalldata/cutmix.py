"""One-class CutMix (OCM): a random box of photo B pasted into photo A of the same class.

The label stays true while the model sees new combinations of object parts, backgrounds
and positions. Every choice an image depends on is drawn from
np.random.default_rng([seed, index]), so any image can be made (or remade after a crash)
on its own and a run is byte-for-byte reproducible. The arguments and a fingerprint of
the source files are kept in <dst>/ocm_args.json: a rerun that matches resumes, one that
does not is refused, so one folder never mixes two runs.
"""
import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import cli, files, lock, memory, plots, records
from .cli import Problems, UsageError, say
from .folders import HELD_OUT, SPLITS, find_classes, list_files, refuse_held_out, refuse_overlap
from .images import BadImage, decode_many, open_rgb, resize_square

ARGS_FILE = "ocm_args.json"
MANIFEST = "manifest.csv"
MANIFEST_HEADER = ["file", "class", "base_image", "patch_image", "x0", "y0", "x1", "y1", "lambda"]
OUTPUT_NAME = re.compile(r"ocm_\d{5}\.png")
MAX_COUNT = 99_999  # the contract's five-digit numbering
FORMAT = 1  # bump when the way an image is made changes, so older outputs are never resumed
RESUME_KEYS = ("format", "count", "img_size", "alpha", "seed", "sources")  # what the images depend on
PREVIEW_CELL = 160  # contact-sheet cell; small images are enlarged to fill it


@dataclass
class Photo:
    name: str  # as the manifest shows it: <src as given>/<class>/<file>
    key: str  # which photo this is across sources: data/br keeps data/train's file stems
    pixels: np.ndarray  # img_size x img_size x 3, uint8


@dataclass
class Item:
    index: int
    cls: str
    a: Photo  # base
    b: Photo  # patch
    box: tuple  # x0, y0, x1, y1 after clipping; x1, y1 exclusive
    lam: float  # 1 - box area / image area: the share of the image that is still A

    @property
    def file(self):
        return f"{self.cls}/ocm_{self.index:05d}.png"


def info(msg):
    say(msg, file=sys.stdout)  # looked up at each call, so a redirected stdout (tests) is followed


# ---------------------------------------------------------------- checks before any work

def count_arg(text):
    count = cli.positive_int(text)
    if count > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"at most {MAX_COUNT} (files are numbered ocm_NNNNN), got {text}")
    return count


def img_size_arg(text):
    size = cli.positive_int(text)
    if size < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8, got {text}")
    return size


def check_sources(srcs):
    """The class names all sources share; refuses held-out splits and differing class sets."""
    seen = set()
    for src in srcs:
        refuse_held_out(src)
        real = Path(src).resolve()
        if real in seen:
            raise UsageError(f"--src {src} is given twice; its photos would count double")
        seen.add(real)
    class_sets = [find_classes(src) for src in srcs]  # raises when a folder is missing
    classes = class_sets[0]
    if not classes:
        raise UsageError(f"{srcs[0]} has no class folders; expected {srcs[0]}/<class>/<image>")
    splits = sorted(set(classes) & set(SPLITS))
    if len(splits) >= 2:  # e.g. --src data: val/ would become a "class"
        raise UsageError(f"{srcs[0]} holds folders named like splits ({', '.join(splits)}); it looks like "
                         "the data folder itself: point --src at data/train")
    for src, other in zip(srcs[1:], class_sets[1:]):
        if other != classes:
            missing = sorted(set(classes) - set(other))
            extra = sorted(set(other) - set(classes))
            raise UsageError(f"every --src must hold the same classes; compared with {srcs[0]}, {src} lacks "
                             f"{', '.join(missing) or 'none'} and has extra {', '.join(extra) or 'none'}. "
                             f"Rebuild it from {srcs[0]} or leave it out")
    return classes


def check_dst(dst, srcs, classes, preview):
    """Refuse a --dst (or --preview) where OCM images would land among photos they are made from."""
    dst = Path(dst).resolve()
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--dst {dst} exists and is not a folder")
    if dst.name.lower() in HELD_OUT:
        raise UsageError(f"--dst {dst} looks like a held-out split; synthetic training images must not go "
                         "there. Use data/ocm")
    for src in srcs:
        refuse_overlap(dst, src, "--dst", "--src", "OCM images need a folder of their own (data/ocm)")
    for cls in classes:  # a class folder that is a link out of --dst would write elsewhere
        if not files.is_inside(cls, dst):
            raise UsageError(f"{dst / cls} leads outside {dst} (a link?); refusing to write there")
    if preview:
        p = Path(preview).resolve()
        if p.suffix.lower() != ".png":
            raise UsageError(f"--preview {preview}: the contact sheet is a PNG; give a name ending in .png")
        if any(files.is_inside(p, Path(s).resolve()) for s in srcs) or (files.is_inside(p, dst) and p.parent != dst):
            raise UsageError(f"--preview {preview} is inside a source or class folder, where it would be "
                             "read as a training photo; put it elsewhere")


# ---------------------------------------------------------------- sources

def source_files(srcs, classes):
    """(index of the source, class, path) of every file in a class folder of each source."""
    return [(i, cls, p) for cls in classes for i, src in enumerate(srcs) for p in list_files(Path(src) / cls)]


def load_pool(srcs, jobs, classes, img_size, problems):
    """Decode every source photo (`jobs`, from source_files) once, squeezed to img_size.

    Returns ({class: [Photo]}, fingerprint): the fingerprint covers the class names and every
    listed file's source, relative path and content (bad files too), so a changed, added or
    repaired source file means a different run.
    """
    def work(job):
        path = job[2]
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            return "unreadable", BadImage(path, f"cannot read ({e.strerror or e})")
        try:
            return digest, np.asarray(resize_square(open_rgb(path), img_size))
        except BadImage as e:
            return digest, e

    fingerprint = hashlib.sha256(f"classes {json.dumps(classes)}\n".encode())
    pool = {cls: [] for cls in classes}
    for (i, cls, path), (digest, out) in decode_many(jobs, work):
        fingerprint.update(f"{i}\t{path.relative_to(srcs[i]).as_posix()}\t{digest}\n".encode())
        if isinstance(out, BadImage):
            problems.skip(out)
            continue
        pool[cls].append(Photo(path.as_posix(), path.stem, out))
    return pool, fingerprint.hexdigest()


def usable_classes(pool):
    """Classes with at least two distinct photos; each other class is warned about."""
    usable = []
    for cls, photos in pool.items():
        n = len({p.key for p in photos})
        if n >= 2:
            usable.append(cls)
        else:
            say(f"warning: class {cls} has {n} usable photo(s); CutMix needs two distinct ones, so it gets "
                "no OCM images and its share goes to the other classes", file=sys.stderr)
    return usable


# ---------------------------------------------------------------- the mix

def rand_bbox(rng, size, lam):
    """The CutMix paper's box: side size*sqrt(1-lam), uniform centre, clipped to the image."""
    cut = int(size * np.sqrt(1.0 - lam))
    cx, cy = rng.integers(size), rng.integers(size)
    x0, x1 = np.clip([cx - cut // 2, cx + cut // 2], 0, size)
    y0, y1 = np.clip([cy - cut // 2, cy + cut // 2], 0, size)
    return int(x0), int(y0), int(x1), int(y1)


def make_plan(pool, classes, count, alpha, seed, size):
    """Every image's class, photos and box, decided up front (cheap; no pixels are touched)."""
    items = []
    for i in range(count):
        cls = classes[i % len(classes)]  # round robin: class counts differ by at most one
        photos = pool[cls]
        rng = np.random.default_rng([seed, i])  # one stream per image: resumable, order-free
        a = photos[rng.integers(len(photos))]
        others = [p for p in photos if p.key != a.key]  # never a photo with its own BR copy
        b = others[rng.integers(len(others))]
        lam = rng.beta(alpha, alpha)
        x0, y0, x1, y1 = rand_bbox(rng, size, lam)
        items.append(Item(i, cls, a, b, (x0, y0, x1, y1), 1.0 - (x1 - x0) * (y1 - y0) / (size * size)))
    return items


def mix(item):
    x0, y0, x1, y1 = item.box
    out = item.a.pixels.copy()
    out[y0:y1, x0:x1] = item.b.pixels[y0:y1, x0:x1]
    return out


def split_count(count, n):
    """What round robin gives each of n classes."""
    return [count // n + (i < count % n) for i in range(n)]


# ---------------------------------------------------------------- the output folder

OWN_NOTES = ("log.txt", "skipped.csv")  # what every script writes into its output folder


def clear_outputs(dst):
    """Delete only what this script writes: <class>/ocm_NNNNN.png, the manifest, the args file."""
    dst = Path(dst)
    if not dst.is_dir():
        return 0
    doomed = [p for p in (dst / MANIFEST, dst / ARGS_FILE) if p.is_file()]
    for d in sorted(dst.iterdir()):
        if d.is_dir() and files.is_inside(d.name, dst):  # never follow a link out of dst
            doomed += [p for p in d.iterdir() if OUTPUT_NAME.fullmatch(p.name) and p.is_file()]
    for p in doomed:
        p.unlink()
    for d in dst.iterdir():  # class folders left empty (a class may have been renamed since)
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    return len(doomed)


def prepare_dst(dst, record, overwrite):
    """Resume, refuse or clear --dst, so that it never mixes the images of two runs."""
    dst = Path(dst)
    if overwrite:
        n = clear_outputs(dst)
        if n:
            info(f"--overwrite: removed {n} file(s) of an earlier run from {dst}")
        return
    args_file = dst / ARGS_FILE
    if args_file.is_file():
        try:
            old = json.loads(args_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{args_file} is unreadable ({e}); rerun with --overwrite to start over") from None
        changed = [k for k in RESUME_KEYS if old.get(k) != record[k]]
        if changed:
            what = ["the source files" if k == "sources" else f"{k} {old.get(k)} -> {record[k]}" for k in changed]
            raise UsageError(f"{dst} holds OCM images of another run (changed: {'; '.join(what)}). "
                             "Rerun with --overwrite to replace them, or choose another --dst")
    elif dst.is_dir() and [p for p in list_files(dst) if p.parent != dst or p.name not in OWN_NOTES]:
        raise UsageError(f"{dst} is not empty and has no {ARGS_FILE}, so its files are not from this script "
                         "with these arguments; choose an empty --dst, or --overwrite to clear old OCM files")


# ---------------------------------------------------------------- preview

def write_preview(path, items, size):
    """Contact sheet: A, B and the result with the box drawn, one row per sampled image."""
    scale = max(1, (PREVIEW_CELL - 4) // size)  # small images enlarged, pixels kept sharp

    def show(arr):
        return Image.fromarray(arr).resize((size * scale, size * scale), Image.Resampling.NEAREST)

    rows = []
    for it in items:
        out = show(mix(it))
        x0, y0, x1, y1 = it.box
        if x1 > x0 and y1 > y0:
            width = max(1, out.width // 80)
            ImageDraw.Draw(out).rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1],
                                          outline=(255, 0, 0), width=width)
        rows.append([(show(it.a.pixels), ["A: " + Path(it.a.name).name]),
                     (show(it.b.pixels), ["B: " + Path(it.b.name).name]),
                     (out, [f"{Path(it.file).stem} lam={it.lam:.2f}"])])
    plots.image_grid(rows, path, cell=PREVIEW_CELL)


# ---------------------------------------------------------------- the whole step

def run(args):
    """make_cutmix.py's work; returns the exit code (UsageError means nothing was done)."""
    srcs, dst = [str(s) for s in args.src], Path(args.dst)
    cli.log_to(dst)
    classes = check_sources(srcs)
    check_dst(dst, srcs, classes, args.preview)
    jobs = source_files(srcs, classes)
    memory.check_ocm(len(jobs), args.count, args.img_size)  # (before any photo is decoded)
    with lock.one_writer(dst, "--dst"):
        return make(args, srcs, dst, classes, jobs)


def make(args, srcs, dst, classes, jobs):
    """Decode, plan, mix and write, the manifest, and last the completion record (records.py)."""
    problems = Problems()
    sources = {records.source_name(src, dst): records.listing(src, [p for j, _, p in jobs if j == i])
               for i, src in enumerate(srcs)}
    pool, fingerprint = load_pool(srcs, jobs, classes, args.img_size, problems)
    usable = usable_classes(pool)
    if not usable:
        raise UsageError("no class has two usable photos, so no OCM image can be made")

    record = {"format": FORMAT, "src": srcs, "count": args.count, "img_size": args.img_size,
              "alpha": args.alpha, "seed": args.seed, "sources": fingerprint}
    prepare_dst(dst, record, args.overwrite)
    records.clear(dst)  # from here on the folder is unfinished until the record is written again
    files.remove_stale_temps(dst)
    files.write_json(dst / ARGS_FILE, record)  # first, so an interrupted run resumes
    for cls in classes:  # every class gets its folder: data/ocm must hold data/train's classes
        (dst / cls).mkdir(parents=True, exist_ok=True)

    items = make_plan(pool, usable, args.count, args.alpha, args.seed, args.img_size)
    todo = [it for it in items if not (dst / it.file).exists()]
    if len(todo) < len(items):
        info(f"{len(items) - len(todo)} of {len(items)} OCM images already in {dst} (same arguments and "
             "sources); skipped them")
    for _ in decode_many(todo, lambda it: files.save_image(Image.fromarray(mix(it)), dst / it.file), "ocm"):
        pass  # (PNG encoding and fsync release the GIL: the same thread pool as decoding)
    files.write_csv(dst / MANIFEST, MANIFEST_HEADER,
                    [[it.file, it.cls, it.a.name, it.b.name, *it.box, f"{it.lam:.6f}"] for it in items])
    per_class = dict(zip(usable, split_count(args.count, len(usable))))
    made = {dst / it.file for it in items}
    foreign = [p for cls in classes for p in list_files(dst / cls) if p not in made]
    if foreign:
        say(f"warning: {len(foreign)} file(s) in {dst} are not this run's images (e.g. {foreign[0]}); training "
            "refuses the folder while they are there: delete them", file=sys.stderr)
    records.write(dst, "ocm", record, classes, sources,
                  records.listing(dst, [dst / it.file for it in items] + [dst / MANIFEST]),
                  {"images": len(items), "per_class": {c: per_class.get(c, 0) for c in classes}})
    if args.preview:
        write_preview(args.preview, items[:args.preview_rows], args.img_size)
        info(f"preview: {args.preview}")

    info(f"made {len(todo)} OCM image(s) in {dst} ({len(items)} in all: "
         f"{', '.join(f'{c} {n}' for c, n in per_class.items())}); manifest {dst / MANIFEST}")
    problems.summary(dst)
    return problems.exit_code()

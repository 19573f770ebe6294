"""Background removal for the BR step: every training photo, object kept, background made plain.

One rembg session (rembg_api) does the masks; everything around it (decoding, rembg's resizes,
compositing, PNG encoding, writing) runs in a few worker threads, so the model never waits for the
disk or for PIL. Only as many inferences run at once as the cores can take (see thread_plan).
"""
import argparse
import csv
import errno
import hashlib
import json
import shutil
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image

from . import cli, files, lock, records, rembg_api, runtime
from .cli import Problems, UsageError, available_cpus, rank, say
from .folders import find_classes, is_junk, list_files, refuse_held_out, refuse_overlap
from .images import BadImage, open_rgb
from .plots import image_grid

COLORS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
# --bg-color auto picks, per photo, the one of these that the fewest object pixels are close to
AUTO_COLORS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "green": (0, 177, 64),
               "blue": (0, 71, 187), "magenta": (255, 0, 255)}
AUTO_CLOSE = 80  # RGB distance under which a pixel "looks like" the background
AUTO_GOOD = 0.02  # a colour that at most this share of the object looks like is good enough: the plainest wins
COLORS_CSV = "bg_colors.csv"  # with --bg-color auto: the colour each output got
ARGS_FILE = "args.json"  # the arguments that made the outputs: a rerun with others is refused without --fresh
# The arguments that decide what an output looks like (not speed, sharding or the preview).
RECORDED = ("src", "model", "bg_color", "keep_alpha", "alpha_matting", "post_process_mask", "min_fg", "max_fg",
            "min_confidence", "fallback", "masks")
MIN_FG, MAX_FG = 0.02, 0.98  # the area guard's defaults: below or above, no object was found
# Mask confidence (see mask_confidence): the pixels a mask touches, those it is sure of, and the share
# of sure pixels below which the BR image would be a half-transparent ghost (bench/mask_confidence.py).
TOUCHED, SURE = 26, 230  # 10 % and 90 % of 255
MIN_CONFIDENCE = 0.5


def parse_color(text):
    """'white', 'black', 'gray', 'R,G,B' (0-255) -> (r, g, b), or 'auto'; an argparse type."""
    name = text.strip().lower()
    if name == "auto":
        return name
    if name in COLORS:
        return COLORS[name]
    try:
        rgb = tuple(int(v) for v in name.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, white, black, gray or R,G,B with values 0-255")
    return rgb


# ---------------------------------------------------------------------------------- the plan

def plan(src, dst):
    """Pair every file under src/<class>/ with dst/<class>/<same sub-folders>/<stem>.png.

    Returns (jobs, stray, classes): jobs are (source, output, class) tuples; stray are files lying
    directly in src, outside any class folder. Two sources that would share an output are an
    error that names both (rembg p silently keeps one of them). Names are compared ignoring case,
    since on macOS and Windows 'A.png' and 'a.png' are the same file.
    """
    src, dst = Path(src), Path(dst)
    classes = find_classes(src)
    if not classes:
        raise UsageError(f"{src} has no class folders; expected {src}/<class>/<image>")
    jobs, seen, clashes = [], {}, []
    for cls in classes:
        for path in list_files(src / cls):
            out = dst / path.relative_to(src).with_suffix(".png")
            key = str(out).casefold()
            if key in seen:
                clashes.append(f"{seen[key]} and {path} would both become {out}")
            seen[key] = path
            jobs.append((path, out, cls))
    if not jobs:
        raise UsageError(f"{src} has class folders ({', '.join(classes)}) but no files in them")
    if clashes:
        raise UsageError("two inputs map to the same output name; rename one of each pair:\n  "
                         + "\n  ".join(clashes))
    # A class or sub-folder of dst that is a link to elsewhere would put outputs outside dst.
    outside = [dst / c for c in classes if not files.is_inside(c, dst)]
    outside += [out for _, out, _ in jobs if not files.is_inside(out.relative_to(dst), dst)]
    if outside:
        raise UsageError(f"{outside[0]} leads outside {dst} (a link?); refusing to write there. "
                         "Remove the link or choose another --dst")
    stray = sorted(p for p in src.iterdir() if p.is_file() and not is_junk(p))
    return jobs, stray, classes


def check_arguments(opt):
    """<dst>/args.json records the arguments the outputs were made with. A rerun with other ones would
    silently keep the old images (existing outputs are skipped): refuse it, unless --fresh or --overwrite
    (which redo every output)."""
    record = asked(opt)
    path = Path(opt.dst) / ARGS_FILE
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old.get("src") != record["src"] and moved_whole(opt):
        old["src"] = record["src"]  # (the same photos' folder, at another path)
    if old is not None and old != record and not (opt.fresh or opt.overwrite):
        differ = [f"{k}: {old.get(k)} -> {record[k]}" for k in RECORDED if old.get(k) != record[k]]
        raise UsageError(f"{opt.dst} holds BR images made with other arguments ({'; '.join(differ)}); a rerun "
                         "would keep them. Pass --fresh to delete them and start over (or --overwrite to redo every "
                         "one), or use another --dst")
    return record


def moved_whole(opt):
    """Whether --dst's completion record names --src as the folder beside it in the same data folder, as it is
    now: a data folder moved or copied whole (--src's path changed, its place beside --dst did not; whether
    its photos changed is the record's to say, photo by photo)."""
    record, name = records.read(opt.dst), records.source_name(opt.src, opt.dst)
    return record is not None and not Path(name).is_absolute() and name in record["sources"]


def asked(opt):
    """The arguments that decide what the outputs look like, as args.json and the completion record keep them."""
    return {k: _plain(getattr(opt, k, None)) for k in RECORDED}


def record_arguments(opt, jobs, extra, shard=None):
    """Once the model is loaded, before the first output changes: the folder is no longer finished (its
    completion record goes); with --fresh, delete this step's earlier outputs (of this shard's photos) and
    the files that come from no photo (`extra`); then write <dst>/args.json."""
    record = check_arguments(opt)
    records.clear(opt.dst)
    if shard is not None:
        share_mark(opt.dst, shard).unlink(missing_ok=True)
    if opt.fresh:
        removed = sum(out.unlink() is None for _, out, _ in jobs if out.exists())
        for path in extra:  # (the files first; then an old class's folder holds none)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        (Path(opt.dst) / colors_csv(shard)).unlink(missing_ok=True)
        say(f"--fresh: removed {removed} earlier output(s)" + (f" and {len(extra)} file(s)/folder(s) from no photo"
                                                               if extra else "") + f" from {opt.dst}")
    files.write_json(Path(opt.dst) / ARGS_FILE, record)


def _plain(value):
    if isinstance(value, Path):
        return str(value.resolve())
    return list(value) if isinstance(value, tuple) else value


def check_folders(src, dst):
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UsageError(f"--src {src}: folder not found (expected {src}/<class>/<image>)")
    refuse_held_out(src)
    refuse_overlap(dst, src, "--dst", "--src", "the outputs would become inputs. Use separate folders, "
                   "e.g. --src data/train --dst data/br")


def leftovers(dst, jobs, classes):
    """Files in dst that no source produces (a photo deleted since the last run, an old class)."""
    dst = Path(dst)
    if not dst.is_dir():
        return []
    wanted = {out for _, out, _ in jobs}
    extra_classes = set(find_classes(dst)) - set(classes)
    # (the step's own files at the top: args.json, bg_colors*.csv, skipped*.csv, log.txt)
    return sorted(p for p in list_files(dst) if p not in wanted and p.parent != dst) + \
        [dst / c for c in sorted(extra_classes)]


# ---------------------------------------------------------------------------------- the model

def choose_providers(device, providers):
    """The ONNX execution providers, chosen explicitly: CUDA when this onnxruntime sees a GPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers:
        wanted = [p.strip() for p in providers.split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UsageError(f"--providers: {', '.join(missing)} not in this onnxruntime "
                             f"(available: {', '.join(available)})")
        return wanted
    cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                         "(install onnxruntime-gpu), or use --device cpu")
    if device != "cpu" and cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def thread_plan(providers, threads=0, workers=0, most=4):
    """(intra-op threads per inference, inferences at once, worker threads).

    On CPU, images in parallel beat operators in parallel: on 2 cores, two u2netp inferences
    of 1 thread each gave 5-10 % more images/s than one of 2 threads (no waiting at each
    operator's barrier). At most `most` at once, since each holds its own activations in memory.
    One worker more than inferences keeps the model fed: it decodes and encodes while the others
    wait on the model. A GPU runs one inference at a time, and needs more workers to keep up.
    """
    cores = available_cpus()
    if providers[0] != "CPUExecutionProvider":
        return threads or cores, 1, workers or min(8, cores)
    threads = threads or max(1, cores // most)
    inferences = max(1, min(most, cores // threads))
    return threads, inferences, workers or inferences + 1


# ---------------------------------------------------------------------------------- one image

def foreground_fraction(mask):
    """Share of pixels the model calls object (mask > 127).

    Not the mean of the mask: rembg stretches every prediction to 0..1, so a blank photo's
    faint all-over guess becomes a grey haze whose mean is several percent. Counting pixels
    above one half ignores that haze.
    """
    return float((np.asarray(mask) > 127).mean())


def mask_confidence(mask):
    """Of the pixels the mask touches (>= 10 %), the share it is sure of (>= 90 %).

    A clear object is sure inside with a thin unsure edge: 0.7..0.95. An object the model is unsure
    of sits at mid values (a crate of fruit, a flower bed): composited it becomes a faint ghost on the
    plain background, which the area guard passes. Low confidence catches it.
    """
    mask = np.asarray(mask)
    touched = int((mask >= TOUCHED).sum())
    return float((mask >= SURE).sum() / touched) if touched else 0.0


def auto_color(img, mask):
    """A plain colour far from the object's own: the first of AUTO_COLORS (white, black, gray, then
    saturated ones) that at most AUTO_GOOD of the object pixels lie close to, else the one the fewest do.
    A white shirt goes on black, a green leaf not on green. Object pixels are all the mask touches,
    faint ones too: a daisy's white petals the mask is unsure of must not go onto white."""
    pixels = np.asarray(img).reshape(-1, 3)[np.asarray(mask).reshape(-1) >= TOUCHED].astype(np.int32)
    if not len(pixels):
        return AUTO_COLORS["white"]
    close = {c: (np.square(pixels - c).sum(1) < AUTO_CLOSE ** 2).mean() for c in AUTO_COLORS.values()}
    return next((c for c, share in close.items() if share <= AUTO_GOOD), min(close, key=close.get))


def composite(img, mask, bg, keep_alpha=False, alpha_matting=False):
    """The object on a plain `bg` background, as RGB; with keep_alpha, RGBA whose colour
    channels are that same RGB image (so dropping the alpha gives the plain-background image,
    never the original scene)."""
    alpha = mask
    cut = rembg_api.matting_cutout(img, mask) if alpha_matting else None
    if cut is not None:
        canvas = Image.new("RGBA", img.size, tuple(bg) + (255,))
        out = Image.alpha_composite(canvas, cut).convert("RGB")
        alpha = cut.getchannel("A")
    else:
        out = Image.composite(img, Image.new("RGB", img.size, tuple(bg)), mask)
    if keep_alpha:
        out.putalpha(alpha)
    return out


def unusable_mask(mask, opt):
    """Why the mask makes no usable BR image (no object found, or found unsure), or None."""
    fg = foreground_fraction(mask)
    if not opt.min_fg <= fg <= opt.max_fg:
        return f"no object found: foreground {fg:.2%} is outside --min-fg {opt.min_fg:.0%} .. --max-fg {opt.max_fg:.0%}"
    confidence = mask_confidence(mask)
    if confidence < opt.min_confidence:
        return (f"unsure mask: only {confidence:.0%} of the pixels it touches are clearly object "
                f"(--min-confidence {opt.min_confidence:.0%}); the object would be a faint ghost")
    return None


def remove_background(job, session, opt):
    """Do one job. Returns (status, note, background colour); status is done, degenerate or copied.

    Raises BadImage for a file that is not a usable image.
    """
    src, out, _ = job
    auto = opt.bg_color == "auto"
    img = open_rgb(src, background=COLORS["white"] if auto else opt.bg_color)  # upright 8-bit RGB, any format
    mask = rembg_api.predict_mask(session, img, opt.post_process_mask)
    if opt.masks:  # the mask itself, for a look or a comparison with a true mask (tools/demo_truth.py)
        files.save_image(mask, Path(opt.masks) / out.relative_to(opt.dst), compress_level=opt.png_level)
    why = unusable_mask(mask, opt)
    if why:
        if opt.fallback == "copy":
            files.save_image(img, out, compress_level=opt.png_level)
            return "copied", why + "; original copied (--fallback copy)", None
        if out.exists():  # --overwrite: an older result of this photo must not stay behind
            out.unlink()
            why += "; its old output was removed"
        return "degenerate", why + "; nothing written (--fallback copy keeps the original)", None
    bg = auto_color(img, mask) if auto else opt.bg_color
    result = composite(img, mask, bg, opt.keep_alpha, opt.alpha_matting)
    files.save_image(result, out, compress_level=opt.png_level)
    return "done", None, bg


# ---------------------------------------------------------------------------------- the run

def spread(jobs, n):
    """Up to n jobs taken round-robin over classes, so a preview shows every class."""
    by_class = {}
    for job in jobs:
        by_class.setdefault(job[2], []).append(job)
    picked, queues = [], [list(v) for v in by_class.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def write_preview(jobs, path, count, pairs_per_row=2):
    """Contact sheet: each original beside its BR image, class name under each."""
    cells = []
    for src, out, cls in spread([j for j in jobs if j[1].exists()], count):
        try:
            cells += [(open_rgb(src), [cls]), (open_rgb(out), [f"{cls} (BR)"])]
        except (BadImage, OSError):
            continue
    if not cells:
        say("--preview: no BR images to show; nothing written")
        return
    step = 2 * pairs_per_row
    image_grid([cells[i:i + step] for i in range(0, len(cells), step)], path)
    say(f"preview: {path}")


def open_planned_session(opt, gpu=0):
    """The session and its thread plan, made for the providers the session really runs on: when
    onnxruntime falls back from the GPU to the CPU, the CPU plan is used (and a warning says so)."""
    asked = choose_providers(opt.device, opt.providers)
    plan_ = thread_plan(asked, opt.threads, opt.workers)
    session = rembg_api.open_session(opt.model, asked, *plan_[:2], gpu=gpu)
    active = rembg_api.providers_of(session)
    if asked[0] not in active:
        say(f"warning: asked for {asked[0]} but onnxruntime runs on {', '.join(active)} (see its messages "
            "above); using the CPU thread plan", file=sys.stderr)
        plan_ = thread_plan(["CPUExecutionProvider"], opt.threads, opt.workers)
        session = rembg_api.open_session(opt.model, ["CPUExecutionProvider"], *plan_[:2])
    return session, plan_


def parse_shard(text):
    """--shard i/n -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= i < n")
    return i, n


def in_shard(src, root, shard):
    """A stable split of the photos: by a checksum of the relative path, the same on every machine."""
    return zlib.crc32(Path(src).relative_to(root).as_posix().encode()) % shard[1] == shard[0]


def colors_csv(shard):
    """bg_colors.csv, or a shard's own bg_colors.shard-I-of-N.csv (shards run at once, each writes its own)."""
    return COLORS_CSV if shard is None else f"bg_colors.shard-{shard[0]}-of-{shard[1]}.csv"


def prepare(opt, problems, shard=None):
    """Check and plan: returns (all jobs, this shard's jobs, its jobs still to do, classes, files outside
    a class folder, files and folders in dst that come from no photo)."""
    check_folders(opt.src, opt.dst)
    if opt.masks:
        for folder, flag in ((opt.src, "--src"), (opt.dst, "--dst")):
            refuse_overlap(opt.masks, folder, "--masks", flag, "masks would be read as photos; give a folder "
                           "outside the data folders", both_ways=False)
    all_jobs, stray, classes = plan(opt.src, opt.dst)
    jobs = [j for j in all_jobs if in_shard(j[0], opt.src, shard)] if shard else all_jobs
    check_arguments(opt)
    for p in stray:
        problems.skip(p, "not inside a class folder; a BR image must keep its class")
    if runtime.world()[1] > 1:  # under torchrun one worker clears, and the others wait for it to finish
        runtime.join_cpu_group()
    stale = files.remove_stale_temps(opt.dst) if runtime.is_main() else 0
    runtime.barrier()
    if stale:
        say(f"removed {stale} temporary file(s) left by an interrupted run")
    used = {cls for _, _, cls in jobs}
    for cls in classes:
        if cls not in used:
            say(f"warning: class folder {Path(opt.src) / cls} holds no files; {Path(opt.dst) / cls} stays "
                "empty (training refuses an empty class)", file=sys.stderr)
    done = records.made_from(opt.dst, opt.src)  # (read before this run clears the record)
    todo = jobs if opt.overwrite or opt.fresh else [j for j in jobs if not (up_to_date(j[1], j[0]) or done(j[1], j[0]))]
    existing = len(jobs) - len(todo)
    say(f"{len(all_jobs)} input file(s) in {len(classes)} classes under {opt.src}; "
        + (f"shard {shard[0]}/{shard[1]}: {len(jobs)} of them; " if shard else "")
        + (f"{existing} already done in {opt.dst}, skipped (--overwrite redoes them); " if existing else "")
        + f"{len(todo)} to do")
    extra = leftovers(opt.dst, all_jobs, classes)
    if extra and not opt.fresh:
        say(f"warning: {len(extra)} file(s)/folder(s) in {opt.dst} come from no file in {opt.src} (e.g. {extra[0]}); "
            "training refuses the folder while they are there: delete them, or rerun with --fresh", file=sys.stderr)
    return all_jobs, jobs, todo, classes, stray, extra


def up_to_date(out, src):
    """An output made after its photo was last changed (as make decides): a changed photo is done again.
    (prepare also takes as done an output the completion record lists as made from this photo's content.)"""
    try:
        return out.stat().st_mtime_ns >= src.stat().st_mtime_ns
    except OSError:  # no output yet (or a source that cannot be read: its job says why)
        return False


def remove_all(todo, extra, opt, problems, gpu=0, shard=None):
    """Run every job on the worker threads; returns ({status: count}, {output: colour}, seconds)."""
    from tqdm import tqdm

    counts, colors = dict(done=0, degenerate=0, copied=0, failed=0), {}
    t0 = time.time()
    session, (threads, inferences, workers) = open_planned_session(opt, gpu)
    record_arguments(opt, todo, extra, shard)  # (only now: a model that cannot be loaded changes nothing)
    say(f"model {opt.model}: onnxruntime providers {', '.join(rembg_api.providers_of(session))}; "
        f"{inferences} inference(s) at once with {threads} intra-op thread(s) each, {workers} worker "
        f"threads; loaded in {time.time() - t0:.1f} s")
    t0 = time.time()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="br")
    try:
        futures = {pool.submit(remove_background, job, session, opt): job for job in todo}
        with tqdm(total=len(todo), unit="img", dynamic_ncols=True, disable=rank() != 0) as bar:
            for fut in as_completed(futures):
                src = futures[fut][0]
                try:
                    status, note, colors[futures[fut][1]] = fut.result()
                except BadImage as e:
                    status, note = "failed", str(e).removeprefix(f"{src}: ")
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full: stop, cli.run explains
                        raise
                    status, note = "failed", f"{type(e).__name__}: {e}"
                except Exception as e:  # one bad file must not stop the others
                    status, note = "failed", f"{type(e).__name__}: {e}"
                counts[status] += 1
                if status == "copied":
                    problems.note(src, note, outcome="copied")
                elif status != "done":
                    problems.skip(src, note)
                bar.update()
    finally:  # on Ctrl-C or a full disk, drop the queued jobs; running ones finish atomically
        pool.shutdown(wait=True, cancel_futures=True)
    return counts, colors, time.time() - t0


def write_colors(dst, jobs, colors, shard=None):
    """<dst>/bg_colors.csv: each output and the colour --bg-color auto gave it (earlier runs' rows kept)."""
    path = Path(dst) / colors_csv(shard)
    rows = {}
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = {r["file"]: r["rgb"] for r in csv.DictReader(f)}
    rows.update({out.relative_to(dst).as_posix(): ",".join(map(str, c)) for out, c in colors.items() if c})
    wanted = {out.relative_to(dst).as_posix() for _, out, _ in jobs if out.exists()}
    files.write_csv(path, ["file", "rgb"], sorted([k, v] for k, v in rows.items() if k in wanted))


def run(opt):
    """The whole BR step; returns the exit code. Under torchrun each worker takes the shard of its rank
    (and the GPU of its local rank), reports its own files, and waits for the others at the end; rank 0
    holds the folder for them all, and marks it complete once every worker is done."""
    rank, workers, local_rank = runtime.world()
    shard = opt.shard or ((rank, workers) if workers > 1 else None)
    cli.WORKERS_SPEAK = workers > 1
    cli.log_to(opt.dst)
    with lock.one_writer(opt.dst, "--dst", shard=opt.shard):
        problems = Problems()
        all_jobs, jobs, todo, classes, stray, extra = prepare(opt, problems, shard)
        sources = {records.source_name(opt.src, opt.dst): records.listing(opt.src, [src for src, _, _ in all_jobs])}
        counts, colors, seconds = remove_all(todo, extra, opt, problems, local_rank, shard) if todo else ({}, {}, 0.0)
        if opt.bg_color == "auto":
            write_colors(opt.dst, jobs, colors, shard)
        counts = {k: counts.get(k, 0) for k in ("done", "degenerate", "copied", "failed")}
        processed = counts["done"] + counts["degenerate"] + counts["copied"]
        rate = processed / seconds if seconds else 0.0
        say(f"summary: done {counts['done']}, skipped as existing {len(jobs) - len(todo)}, degenerate "
            f"{counts['degenerate'] + counts['copied']}"
            + (f" ({counts['copied']} written as the original, --fallback copy)" if counts["copied"] else "")
            + f", failed {counts['failed']}, not in a class folder {len(stray)}; "
            f"{seconds:.1f} s, {rate:.2f} images/s (model load not counted) -> {opt.dst}")
        problems.summary(opt.dst, "skipped.csv" if shard is None else f"skipped.shard-{shard[0]}-of-{shard[1]}.csv")
        if workers > 1:  # torchrun stops every worker when one exits non-zero: wait until all are done
            runtime.barrier()
            runtime.teardown()
        if runtime.is_main():
            mark_complete(opt, all_jobs, classes, sources, opt.shard)
        if opt.preview and (shard is None or shard[0] == 0):
            write_preview(all_jobs, opt.preview, opt.preview_count)
    return problems.exit_code()


def share_mark(dst, shard):
    """A --shard I/N run's mark of its share done: the last share to finish completes the folder."""
    return Path(dst) / f"complete.shard-{shard[0]}-of-{shard[1]}.json"


def mark_complete(opt, all_jobs, classes, sources, shard=None):
    """The completion record of dst, written last (records.py): every class folder, what was asked, the
    source photos, and the outputs there are. With --shard I/N, once every share has marked itself done
    with the same arguments and photos (any share may be the last; each would write the same record)."""
    dst = Path(opt.dst)
    for cls in classes:  # every class folder, even one whose photos all failed
        (dst / cls).mkdir(parents=True, exist_ok=True)
    if shard is not None:  # (the mark: a digest of the arguments and the photos, the same for every share)
        mark = {"made_with": hashlib.sha256(json.dumps([asked(opt), sources], sort_keys=True).encode()).hexdigest()}
        files.write_json(share_mark(dst, shard), mark)
        marks = [share_mark(dst, (i, shard[1])) for i in range(shard[1])]
        if not all(m.is_file() and json.loads(m.read_text()) == mark for m in marks):
            say(f"share {shard[0]}/{shard[1]} done; {dst} is complete once every share has run")
            return
    made = records.listing(dst, [out for _, out, _ in all_jobs if out.exists()])
    records.write(dst, "br", asked(opt), classes, sources, made,
                  {"photos": len(all_jobs), "made": len(made), "without an image": len(all_jobs) - len(made)})


def list_models():
    rows = rembg_api.model_table()
    width = max(len(n) for n, _, _ in rows)
    for name, ok, note in rows:
        print(f"{name:<{width}}  {'available offline' if ok else 'not available':<17}  {note}")
    print(f"\nuse one that is available offline, e.g. --model {rembg_api.OFFLINE_MODEL}")
    return 0

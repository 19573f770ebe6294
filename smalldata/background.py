"""Background removal for the BR step: every training photo, object kept, background made plain.

One rembg session does the masks; everything around it (decoding, rembg's resizes, compositing,
PNG encoding, writing) runs in a few worker threads, so the model never waits for the disk or for
PIL. A gate lets only as many inferences run at once as the cores can take (see thread_plan).
"""
import argparse
import contextlib
import errno
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image

from . import files
from .cli import Problems, UsageError, say
from .folders import find_classes, refuse_held_out
from .images import BadImage, is_junk, list_files, open_rgb
from .plots import contact_sheet
from .rembg_models import model_home

COLORS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
OFFLINE_MODEL = "u2netp"  # the model that set-up puts in place (tools/fetch_models.py)
# rembg's own alpha-matting defaults (rembg p -af/-ab/-ae)
MATTING = dict(foreground_threshold=240, background_threshold=10, erode_structure_size=10)


def parse_color(text):
    """'white', 'black', 'gray' or 'R,G,B' (0-255) -> (r, g, b); an argparse type."""
    name = text.strip().lower()
    if name in COLORS:
        return COLORS[name]
    try:
        rgb = tuple(int(v) for v in name.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise argparse.ArgumentTypeError(f"{text!r}: use white, black, gray or R,G,B with values 0-255")
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


def check_folders(src, dst):
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UsageError(f"--src {src}: folder not found (expected {src}/<class>/<image>)")
    refuse_held_out(src)
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--dst {dst} is a file; give a folder")
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UsageError(f"--src {src} and --dst {dst} overlap; the outputs would become inputs. "
                         "Use separate folders, e.g. --src data/train --dst data/br")


def leftovers(dst, jobs, classes):
    """Files in dst that no source produces (a photo deleted since the last run, an old class)."""
    dst = Path(dst)
    if not dst.is_dir():
        return []
    wanted = {out for _, out, _ in jobs}
    extra_classes = set(find_classes(dst)) - set(classes)
    return sorted(p for p in list_files(dst) if p not in wanted) + [dst / c for c in sorted(extra_classes)]


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


def cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_plan(providers, threads=0, workers=0, most=4):
    """(intra-op threads per inference, inferences at once, worker threads).

    On CPU, images in parallel beat operators in parallel: on 2 cores, two u2netp inferences
    of 1 thread each gave 5-10 % more images/s than one of 2 threads (no waiting at each
    operator's barrier). At most `most` at once, since each holds its own activations in memory.
    One worker more than inferences keeps the model fed: it decodes and encodes while the others
    wait on the model. A GPU runs one inference at a time, and needs more workers to keep up.
    """
    cores = cpu_count()
    if providers[0] != "CPUExecutionProvider":
        return threads or cores, 1, workers or min(8, cores)
    threads = threads or max(1, cores // most)
    inferences = max(1, min(most, cores // threads))
    return threads, inferences, workers or inferences + 1


class Gate:
    """An onnxruntime session whose run() admits at most `n` callers at a time.

    Worker threads call rembg's session.predict concurrently, so rembg's resizes and our
    decoding, compositing and encoding overlap with inference; the gate keeps more
    inferences than planned from fighting over the cores.
    """

    def __init__(self, inner, n):
        self._inner, self._gate = inner, threading.Semaphore(n)

    def run(self, *args, **kwargs):
        with self._gate:
            return self._inner.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _NoDownload(Exception):
    pass


@contextlib.contextmanager
def no_downloads():
    """Make rembg's model download (pooch.retrieve) raise instead of fetching anything."""
    import pooch

    def refuse(*args, **kwargs):
        raise _NoDownload("not downloaded")

    real, pooch.retrieve = pooch.retrieve, refuse
    try:
        yield
    finally:
        pooch.retrieve = real


def model_table():
    """[(name, available offline now, note)] for every rembg model; downloads nothing."""
    model_home()
    from rembg.sessions import sessions_class

    rows = []
    with no_downloads():
        for cls in sessions_class:
            name = cls.name()
            if not cls.is_local():
                rows.append((name, False, "remote service: would send the photos off this machine"))
                continue
            try:
                rows.append((name, True, str(cls.download_models())))
            except _NoDownload:
                rows.append((name, False, "not downloaded (needs internet)"))
            except Exception as e:  # custom models need a model_path, etc.
                rows.append((name, False, f"cannot be set up from its name alone: {e}"))
    return rows


def load_session(model, providers, threads, inferences):
    """One rembg session for the whole run; a model that cannot be had offline -> UsageError."""
    model_home()
    import onnxruntime as ort
    from rembg import new_session
    from rembg.sessions import sessions

    if model not in sessions:
        raise UsageError(f"--model {model}: unknown; rembg has {', '.join(sorted(sessions))}. "
                         f"Try --model {OFFLINE_MODEL} (see --list-models)")
    if not sessions[model].is_local():
        raise UsageError(f"--model {model} is a remote service that would send the training photos "
                         f"off this machine; use a local model, e.g. --model {OFFLINE_MODEL}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Idle intra-op threads would busy-wait between operators, taking the CPU that the worker
    # threads need for decoding and encoding.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = new_session(model, sess_opts=opts, providers=list(providers))
    except Exception as e:
        raise UsageError(f"--model {model} could not be loaded: it is not available offline and could "
                         f"not be downloaded ({type(e).__name__}: {str(e)[:300]}). Use --model "
                         f"{OFFLINE_MODEL} (available offline after tools/fetch_models.py; "
                         "see --list-models)") from None
    if hasattr(session, "inner_session"):
        session.inner_session = Gate(session.inner_session, inferences)
    else:  # sessions with several onnx graphs (sam): gate the whole predict
        session.predict = _gated(session.predict, inferences)
    return session


def _gated(fn, n):
    gate = threading.Semaphore(n)

    def gated(*args, **kwargs):
        with gate:
            return fn(*args, **kwargs)
    return gated


def active_providers(session):
    inner = getattr(session, "inner_session", None)
    return inner.get_providers() if inner is not None else ["(not reported by this session)"]


# ---------------------------------------------------------------------------------- one image

def predict_mask(session, img, post_process=False):
    """The model's mask for `img` as an L image of the same size (255 = object)."""
    masks = [np.asarray(m.convert("L")) for m in session.predict(img)]
    mask = np.maximum.reduce(masks)  # models with several masks (cloth parts): their union
    if post_process:
        from rembg.bg import post_process as rembg_post_process

        mask = rembg_post_process(mask)
    mask = Image.fromarray(mask, "L")
    return mask if mask.size == img.size else mask.resize(img.size, Image.Resampling.LANCZOS)


def foreground_fraction(mask):
    """Share of pixels the model calls object (mask > 127).

    Not the mean of the mask: rembg stretches every prediction to 0..1, so a blank photo's
    faint all-over guess becomes a grey haze whose mean is several percent. Counting pixels
    above one half ignores that haze.
    """
    return float((np.asarray(mask) > 127).mean())


def composite(img, mask, bg, keep_alpha=False, alpha_matting=False):
    """The object on a plain `bg` background, as RGB; with keep_alpha, RGBA whose colour
    channels are that same RGB image (so dropping the alpha gives the plain-background image,
    never the original scene)."""
    alpha, cut = mask, None
    if alpha_matting:
        from rembg.bg import alpha_matting_cutout

        with contextlib.suppress(ValueError):  # rembg falls back to the plain mask the same way
            cut = alpha_matting_cutout(img, mask, **MATTING)
    if cut is not None:
        canvas = Image.new("RGBA", img.size, tuple(bg) + (255,))
        out = Image.alpha_composite(canvas, cut).convert("RGB")
        alpha = cut.getchannel("A")
    else:
        out = Image.composite(img, Image.new("RGB", img.size, tuple(bg)), mask)
    if keep_alpha:
        out.putalpha(alpha)
    return out


def remove_background(job, session, opt):
    """Do one job. Returns (status, note); status is done, degenerate or copied.

    Raises BadImage for a file that is not a usable image.
    """
    src, out, _ = job
    img = open_rgb(src, background=opt.bg_color)  # upright, 8-bit RGB, any input format
    mask = predict_mask(session, img, opt.post_process_mask)
    fg = foreground_fraction(mask)
    if not opt.min_fg <= fg <= opt.max_fg:
        why = (f"no object found: foreground {fg:.2%} is outside "
               f"--min-fg {opt.min_fg:.0%} .. --max-fg {opt.max_fg:.0%}")
        if opt.fallback == "copy":
            files.save_image(img, out, compress_level=opt.png_level)
            return "copied", why + "; original copied (--fallback copy)"
        if out.exists():  # --overwrite: an older result of this photo must not stay behind
            out.unlink()
            why += "; its old output was removed"
        return "degenerate", why + "; nothing written (--fallback copy keeps the original)"
    result = composite(img, mask, opt.bg_color, opt.keep_alpha, opt.alpha_matting)
    files.save_image(result, out, compress_level=opt.png_level)
    return "done", None


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
            cells += [(open_rgb(src), cls), (open_rgb(out), f"{cls} (BR)")]
        except (BadImage, OSError):
            continue
    if not cells:
        say("--preview: no BR images to show; nothing written")
        return
    step = 2 * pairs_per_row
    contact_sheet([cells[i:i + step] for i in range(0, len(cells), step)], path)
    say(f"preview: {path}")


def run(opt):
    """The whole BR step; returns the exit code."""
    from tqdm import tqdm

    check_folders(opt.src, opt.dst)
    jobs, stray, classes = plan(opt.src, opt.dst)
    problems = Problems()
    for p in stray:
        problems.skip(p, "not inside a class folder; a BR image must keep its class")
    stale = files.remove_stale_temps(opt.dst)
    if stale:
        say(f"removed {stale} temporary file(s) left by an interrupted run")
    used = {cls for _, _, cls in jobs}
    for cls in classes:  # every class folder, even one whose photos all fail
        (Path(opt.dst) / cls).mkdir(parents=True, exist_ok=True)
        if cls not in used:
            say(f"warning: class folder {Path(opt.src) / cls} holds no files; {Path(opt.dst) / cls} stays "
                "empty (training refuses an empty class)", file=sys.stderr)
    todo = jobs if opt.overwrite else [j for j in jobs if not j[1].exists()]
    existing = len(jobs) - len(todo)
    say(f"{len(jobs)} input file(s) in {len(classes)} classes under {opt.src}; "
        + (f"{existing} already done in {opt.dst}, skipped (--overwrite redoes them); " if existing else "")
        + f"{len(todo)} to do")
    extra = leftovers(opt.dst, jobs, classes)
    if extra:
        say(f"warning: {len(extra)} file(s)/folder(s) in {opt.dst} come from no file in {opt.src} "
            f"(e.g. {extra[0]}); delete them or use a fresh --dst so they do not reach training")

    counts = dict(done=0, degenerate=0, copied=0, failed=0)
    seconds = 0.0
    if todo:
        providers = choose_providers(opt.device, opt.providers)
        threads, inferences, workers = thread_plan(providers, opt.threads, opt.workers)
        t0 = time.time()
        session = load_session(opt.model, providers, threads, inferences)
        say(f"model {opt.model}: onnxruntime providers {', '.join(active_providers(session))} "
            f"(asked for {', '.join(providers)}); {inferences} inference(s) at once with {threads} "
            f"intra-op thread(s) each, {workers} worker threads; loaded in {time.time() - t0:.1f} s")
        if providers[0] not in active_providers(session):
            say(f"warning: asked for {providers[0]} but onnxruntime runs on "
                f"{', '.join(active_providers(session))} (see its messages above)", file=sys.stderr)
        t0 = time.time()
        pool = ThreadPoolExecutor(workers, thread_name_prefix="br")
        try:
            futures = {pool.submit(remove_background, job, session, opt): job for job in todo}
            with tqdm(total=len(todo), unit="img", dynamic_ncols=True) as bar:
                for fut in as_completed(futures):
                    src = futures[fut][0]
                    try:
                        status, note = fut.result()
                    except BadImage as e:
                        status, note = "failed", str(e).removeprefix(f"{src}: ")
                    except OSError as e:
                        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # disk full: stop, main_wrapper explains
                            raise
                        status, note = "failed", f"{type(e).__name__}: {e}"
                    except Exception as e:  # one bad file must not stop the others
                        status, note = "failed", f"{type(e).__name__}: {e}"
                    counts[status] += 1
                    if status == "copied":
                        say(f"note: {src}: {note}")
                    elif status != "done":
                        problems.skip(src, note)
                    bar.update()
        finally:  # on Ctrl-C or a full disk, drop the queued jobs; running ones finish atomically
            pool.shutdown(wait=True, cancel_futures=True)
        seconds = time.time() - t0

    processed = counts["done"] + counts["degenerate"] + counts["copied"]
    rate = processed / seconds if seconds else 0.0
    degenerate = counts["degenerate"] + counts["copied"]
    say(f"summary: done {counts['done']}, skipped as existing {existing}, degenerate {degenerate}"
        + (f" ({counts['copied']} written as the original, --fallback copy)" if counts["copied"] else "")
        + f", failed {counts['failed']}, not in a class folder {len(stray)}; "
        f"{seconds:.1f} s, {rate:.2f} images/s (model load not counted) -> {opt.dst}")
    if opt.preview:
        write_preview(jobs, opt.preview, opt.preview_count)
    problems.summary()
    return problems.exit_code()


def list_models():
    rows = model_table()
    width = max(len(n) for n, _, _ in rows)
    for name, ok, note in rows:
        print(f"{name:<{width}}  {'available offline' if ok else 'not available':<17}  {note}")
    print(f"\nuse one that is available offline, e.g. --model {OFFLINE_MODEL}")
    return 0

"""Every picture a person looks at: training curves, confusion matrices and captioned image grids.

Written atomically, with matplotlib's object-oriented API (no pyplot): safe on the background
writer thread, and no display needed.
"""
import atexit
import functools
import io
import math
import os
import signal
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from . import files, rule
from .images import BadImage, open_rgb


@functools.cache
def cjk_font_path():
    """Noto Sans CJK (Hangul, kana, Han and Latin), from the noto-cjk-sans-jp-regular package; None without it."""
    try:
        from noto_cjk_sans_jp_regular import FONT_PATH
    except ImportError:
        return None
    return str(FONT_PATH) if FONT_PATH.is_file() else None


def warn_if_boxes(texts):
    """Say once, when a text has letters beyond Latin and the CJK font is missing, that they will draw as
    boxes and how to fix it."""
    if cjk_font_path() is None and any(ord(ch) > 0x24F for t in texts for ch in str(t)):
        _say_font_missing()


@functools.cache
def _say_font_missing():
    from .cli import say

    say("warning: the Noto Sans CJK font (package noto-cjk-sans-jp-regular) is not installed, so class names "
        "in Korean, Japanese, Chinese and other non-Latin scripts draw as boxes in the pictures; fix: "
        ".venv/bin/python -m pip install noto-cjk-sans-jp-regular==0.0.1 (tools/setup.sh installs it)")


@functools.cache
def _matplotlib_fonts():
    """Latin from DejaVu Sans, everything else falls back to Noto Sans CJK (matplotlib >= 3.6 falls
    back glyph by glyph). Without the CJK font, missing glyphs draw as boxes, without a warning per glyph."""
    import matplotlib
    from matplotlib import font_manager

    families = ["DejaVu Sans"]
    if cjk_font_path():
        font_manager.fontManager.addfont(cjk_font_path())
        families.append(font_manager.FontProperties(fname=cjk_font_path()).get_name())
    else:
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    matplotlib.rcParams["font.family"] = families


def _figure(width=10, height=4):
    from matplotlib.figure import Figure

    _matplotlib_fonts()
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


_POOL = []


def elsewhere(fn, *args):
    """Run a drawing function in a helper process (started once, with spawn) and wait for it: matplotlib
    holds the GIL for its whole drawing, which would slow the training thread of this process.

    The helper never sees Ctrl-C (the terminal sends it to every process of the group): the process that
    started it reports the interrupt in one line and the helper ends with it. It is started with SIGINT
    blocked, which it inherits until it has set SIGINT aside, so not even its start-up can be interrupted."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from . import cli

    if not _POOL:
        _POOL.append(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_helper,
                                         initargs=(os.getpid(), cli.log_path())))
        atexit.register(stop_helper)  # (an interrupted run ends it too, before Python takes its modules apart)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # (in this thread, while it spawns)
    try:
        future = _POOL[0].submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return future.result()


def _helper(parent, log_path):
    """In the helper: ignore Ctrl-C, send library warnings to the run's log, as the parent does, and end
    with the parent."""
    from . import cli

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if log_path is not None:
        cli.log_to(log_path.parent, header=False)
    _exit_with_parent(parent)


def _exit_with_parent(parent):
    """In the helper: end when the process that started it is gone (killed, say), not live on holding
    matplotlib's memory; checked every second on a daemon thread."""
    import threading
    import time

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def stop_helper():
    while _POOL:
        _POOL.pop().shutdown()


def save_figure(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    files.write_bytes(path, buf.getvalue())


def training_curves(rows, path, title, marks=None, window=5):
    """Loss and accuracy per epoch: train, val with its noise band (one standard error), the gap and
    its smoothed trend, watch_acc when recorded, the weight averages' val (SWA, EMA) where they were scored
    every epoch, and a vertical line at each marked epoch {epoch: label}."""
    save_figure(curves_figure(rows, title, marks, window), path)


def curves_figure(rows, title, marks=None, window=5):
    """The figure of training_curves."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(12, 4.5)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    val, gap = [r["val_acc"] for r in rows], [r["gap"] for r in rows]
    se = [rule.se_points(r["val_acc"], r["val_n"]) if "val_n" in r else 0.0 for r in rows]
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, label="train (originals)")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", ms=3, label="val")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], "o-", ms=3, label="train (originals)")
    ax_acc.plot(epochs, val, "o-", ms=3, color="C1", label="val")
    ax_acc.fill_between(epochs, [max(0.0, v - s) for v, s in zip(val, se)], [min(100.0, v + s) for v, s in zip(val, se)],
                        color="C1", alpha=0.15, label="val +- 1 SE (photo-count noise)")  # (an accuracy stays in 0-100)
    if any("watch_acc" in r and r["watch_acc"] != "" for r in rows):
        ax_acc.plot(epochs, [r.get("watch_acc") for r in rows], ":", color="C2", label="watch (analysis only)")
    for i, average in enumerate(("swa", "ema")):  # the candidates, where scored every epoch
        at = [(r["epoch"], r[f"{average}_val_acc"], r[f"{average}_val_loss"]) for r in rows
              if r.get(f"{average}_val_acc") not in (None, "")]
        if at:
            e, acc, loss = zip(*at)
            ax_acc.plot(e, acc, "-.", lw=1, color=f"C{4 + i}", label=f"{average.upper()} val")
            ax_loss.plot(e, loss, "-.", lw=1, color=f"C{4 + i}", label=f"{average.upper()} val")
    ax_acc.plot(epochs, gap, "--", color="gray", lw=1, label="gap (train - val)")
    ax_acc.plot(epochs, rule.smoothed(gap, window // 2), "-", color="black", lw=1.5, label="gap, smoothed")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        for epoch, text in (marks or {}).items():
            ax.axvline(epoch, color="red", lw=1)
            ax.annotate(f"{text}: epoch {epoch}", (epoch, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=8, color="red")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def bars_with_intervals(labels, values, lows, highs, path, title, note=""):
    """Bars (percent) with their 95 % intervals as error bars, a value on each, and a note under them."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    xs = range(len(labels))
    ax.bar(xs, values, color=["#8c8c8c", "#4c72b0", "#55a868", "#c44e52"][:len(labels)],
           yerr=[[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]], capsize=6)
    for x, v, hi in zip(xs, values, highs):
        ax.text(x, hi + 1.5, f"{v:.1f} %", ha="center", va="bottom", fontsize=10)
    ax.set_xticks(list(xs), labels, fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    if note:
        ax.set_xlabel(note, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def confusion(matrix, classes, path, title):
    """Row-normalised confusion matrix; stays readable at 100+ classes (smaller, thinned labels)."""
    import matplotlib
    import numpy as np

    warn_if_boxes(classes)
    c = len(classes)
    cm = matrix.double().numpy()
    rows = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, cm / rows, np.nan)  # a class absent from the data: a grey row
    side = min(22.0, max(6.0, 3 + 0.19 * c))  # inches
    fig = _figure(side + 2.5, side)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.9")
    # square-root colour scale: a few stray mistakes in a row stay visible next to the diagonal
    im = ax.imshow(norm, cmap=cmap, norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    cell_pt = side * 0.75 * 72 / c  # points per row, roughly
    step = max(1, math.ceil(6 / cell_pt))  # thin the labels below 6 pt per row
    fontsize = min(9.0, max(5.0, 0.8 * cell_pt * step))
    ticks = list(range(0, c, step))
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=fontsize)
    if c <= 20:  # few enough cells to print the percentages
        for t in range(c):
            for p in range(c):
                if cm[t, p]:
                    ax.text(p, t, f"{100 * norm[t, p]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if norm[t, p] > 0.35 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (each row sums to 1)")
    ax.set_title(title, fontsize=11 if c <= 20 else 14)
    fig.colorbar(im, ax=ax, shrink=0.6, label="fraction of the row")
    save_figure(fig, path)


# ---------------------------------------------------------------- image grids

@functools.cache
def _font(size):
    try:
        if cjk_font_path():
            return ImageFont.truetype(cjk_font_path(), size)
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw, text, font, width):
    """`text`, cut short with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(rows, path, cell=160, heading=None):
    """A PNG grid of captioned images. `rows`: lists of (PIL image, caption lines) cells; a caption
    line is a text, or a (text, colour) pair. Each image is scaled (up or down) to fit its cell."""
    font, head_font, line = _font(13), _font(16), 17
    warn_if_boxes([heading or ""] + [t if isinstance(t, str) else t[0] for row in rows for _, cap in row for t in cap])
    lines = max(len(caption) for row in rows for _, caption in row)
    height, head = cell + lines * line + 4, (34 if heading else 0)
    width = max(max(len(r) for r in rows) * cell, 720 if heading else 0)
    sheet = Image.new("RGB", (width, head + len(rows) * height), "white")
    draw = ImageDraw.Draw(sheet)
    if heading:
        draw.text((8, 8), _fit(draw, heading, head_font, width - 16), fill="black", font=head_font)
    box = cell - 8
    for r, row in enumerate(rows):
        y = head + r * height
        for c, (img, caption) in enumerate(row):
            x, img = c * cell, img.convert("RGB")
            fit = min(box / img.width, box / img.height)
            img = img.resize((max(1, round(img.width * fit)), max(1, round(img.height * fit))),
                             Image.Resampling.BICUBIC)
            ix, iy = x + (cell - img.width) // 2, y + (cell - img.height) // 2
            sheet.paste(img, (ix, iy))
            draw.rectangle((ix - 1, iy - 1, ix + img.width, iy + img.height), outline="gray")  # shows white photos
            for k, text in enumerate(caption):
                text, colour = (text, "black") if isinstance(text, str) else text
                draw.text((x + 4, y + cell + k * line), _fit(draw, text, font, cell - 8), fill=colour, font=font)
    files.save_image(sheet, path)
    return sheet


def message_sheet(text, path):
    """A small PNG that only says `text` (so an old picture never outlives its run)."""
    sheet = Image.new("RGB", (640, 80), "white")
    ImageDraw.Draw(sheet).text((12, 28), text, fill="black", font=_font(16))
    files.save_image(sheet, path)
    return sheet


def mistake_caption(file, true, pred, conf):
    """The lines under a wrongly classified photo: its file name (grey), true class, prediction (red)."""
    return [(Path(file).name, (90, 90, 90)), f"true: {true}", (f"pred: {pred} {100 * conf:.0f}%", (200, 0, 0))]


def mistakes_sheet(mistakes, path, total, n, cols=8):
    """A grid of wrongly classified photos, each captioned with its file name, true and predicted class.

    `mistakes`: (path, true name, predicted name, confidence) rows, drawn in the order given.
    With no mistakes the sheet says so, so an old sheet never outlives its run.
    """
    if not mistakes:
        return message_sheet(f"No mistakes: all {n} images were classified correctly.", path)
    cells = []
    for file, true, pred, conf in mistakes:
        try:
            img = open_rgb(file)
        except BadImage:  # changed since it was scored
            img = Image.new("RGB", (64, 64), "lightgray")
        cells.append((img, mistake_caption(file, true, pred, conf)))
    shown = "all shown" if len(mistakes) == total else f"the {len(mistakes)} most confident shown"
    return image_grid([cells[i:i + cols] for i in range(0, len(cells), cols)], path, cell=180,
                      heading=f"{total} of {n} images wrong ({shown}). Grey: file; black: true class; "
                              "red: predicted class, confidence")

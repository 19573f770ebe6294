"""Pictures a person looks at: training curves and contact sheets. Written atomically."""
import io

from PIL import Image, ImageDraw

from . import files


def _figure(width=10, height=4):
    # The object-oriented API without pyplot: safe on the background writer thread, no display needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig, path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    files.write_bytes(path, buf.getvalue())


def training_curves(rows, path, title, marked_epoch=None, marked_label=None):
    """Loss and accuracy, train and val, per epoch; `marked_epoch` gets a vertical line."""
    fig = _figure()
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", ms=3, label="train (eval mode, originals)")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "o-", ms=3, label="val")
        if key == "acc":
            ax.plot(epochs, [r["gap"] for r in rows], "--", color="gray", label="gap (train - val)")
        if marked_epoch is not None:
            ax.axvline(marked_epoch, color="red", lw=1, label=marked_label or f"epoch {marked_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def contact_sheet(rows, path, cell=160, caption_height=16):
    """A grid PNG: each row is a list of (PIL image, caption) cells, drawn left to right."""
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (ncols * cell, len(rows) * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = r * (cell + caption_height)
        for c, (img, caption) in enumerate(row):
            thumb = img.convert("RGB")
            thumb.thumbnail((cell - 4, cell - 4))
            x = c * cell
            sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
            draw.text((x + 3, y + cell), str(caption)[: cell // 6], fill="black")
    files.save_image(sheet, path)
    return sheet

"""make_remove_background.py on real photos (skimage.data) with the real u2netp model, on CPU."""
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_script, skimage_photos, write_photo_set
from smalldata.background import mask_confidence, parse_color, unusable_mask
from smalldata.files import TEMP_MARK
from smalldata.images import open_rgb

SCRIPT = "make_remove_background.py"
COLOR = (10, 200, 30)  # a colour no skimage photo is made of
# u2netp is unsure of most of these small (80 px) photos; the confidence check has its own tests below
MODEL = ("--model", "u2netp", "--min-confidence", "0")


def pngs(root):
    return sorted(p.relative_to(root) for p in Path(root).rglob("*.png") if not p.name.startswith("."))


def temps(root):
    return sorted(Path(root).rglob(f".*{TEMP_MARK}*"))


def photo(name, size=(80, 60)):
    return Image.fromarray(skimage_photos()[name]).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """4 classes x 2 photos plus one in a nested sub-folder, BR'd once onto COLOR with a preview."""
    root = tmp_path_factory.mktemp("br")
    train = write_photo_set(root / "train", per_class=2, size=80)
    (train / "chelsea" / "indoor").mkdir()
    photo("chelsea").save(train / "chelsea" / "indoor" / "sofa.jpg", quality=92)
    proc = run_script(SCRIPT, "--src", train, "--dst", root / "br", *MODEL,
                      "--bg-color", ",".join(map(str, COLOR)), "--preview", root / "preview.png", check=0)
    return root, proc


def test_outputs_keep_classes_and_sub_folders(first_run):
    root, proc = first_run
    expected = sorted(p.relative_to(root / "train").with_suffix(".png")
                      for p in (root / "train").rglob("*.jpg"))
    assert len(expected) == 9 and pngs(root / "br") == expected
    assert "done 9" in proc.stdout and "CPUExecutionProvider" in proc.stdout
    for rel in expected:
        out = Image.open(root / "br" / rel)
        assert out.mode == "RGB" and out.size == Image.open((root / "train" / rel).with_suffix(".jpg")).size


def test_object_kept_on_plain_background(first_run):
    root, _ = first_run
    for p in (root / "br").rglob("*.png"):
        a = np.asarray(Image.open(p))
        bg = (a == COLOR).all(axis=2).mean()
        assert 0.02 < bg < 0.98, f"{p}: background covers {bg:.0%}"  # object kept, scene removed


def test_preview_is_a_png(first_run):
    root, proc = first_run
    with Image.open(root / "preview.png") as im:
        assert im.format == "PNG" and im.width >= 4 * 100
    assert "preview:" in proc.stdout


def test_rerun_skips_and_overwrite_redoes(first_run, tmp_path):
    root, _ = first_run
    dst = tmp_path / "br"
    shutil.copytree(root / "br", dst)
    rgb = {rel: np.asarray(Image.open(dst / rel)) for rel in pngs(dst)}
    proc = run_script(SCRIPT, "--src", root / "train", "--dst", dst, *MODEL, "--bg-color", ",".join(map(str, COLOR)),
                      check=0)  # the same arguments: nothing to do
    assert "skipped as existing 9" in proc.stdout and "done 0" in proc.stdout
    assert "model u2netp" not in proc.stdout  # nothing to do: the model is not even loaded

    proc = run_script(SCRIPT, "--src", root / "train", "--dst", dst, *MODEL, "--bg-color",
                      ",".join(map(str, COLOR)), "--overwrite", "--keep-alpha", check=0)
    assert "done 9" in proc.stdout
    seen_bg = seen_fg = 0
    for rel, old in rgb.items():
        new = np.asarray(Image.open(dst / rel))
        assert new.shape[2] == 4
        alpha, orig = new[..., 3], np.asarray(open_rgb((root / "train" / rel).with_suffix(".jpg")))
        bg, fg = alpha == 0, alpha == 255
        # where the mask is zero the RGB output is exactly the chosen colour; where it is
        # full, exactly the photo; in between, the blend; the RGBA file's colours are the RGB file's
        assert (old[bg] == COLOR).all() and (old[fg] == orig[fg]).all()
        a = alpha[..., None] / 255.0
        assert np.abs(old - (orig * a + np.array(COLOR) * (1 - a))).max() <= 1.0
        assert (new[..., :3] == old).all()
        seen_bg, seen_fg = seen_bg + bg.sum(), seen_fg + (alpha > 127).sum()
    assert seen_bg > 1000 and seen_fg > 1000


def test_any_image_kind_and_bad_files_reported(tmp_path):
    src = tmp_path / "train" / "cat"
    src.mkdir(parents=True)
    cat = photo("chelsea")
    cat.convert("L").save(src / "gray.png")
    cat.convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png")
    rgba = cat.copy()
    rgba.putalpha(255)
    rgba.save(src / "rgba.png")
    cat.convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(np.asarray(cat.convert("L"), np.uint16) * 257).save(src / "sixteen.png")
    cat.save(src / "webp.webp")
    cat.save(src / "bmp.bmp")
    cat.save(src / "tiff.tiff")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    cat.save(src / "rotated.jpg", exif=exif)
    (src / "corrupt.jpg").write_bytes((src / "rotated.jpg").read_bytes()[:300])
    (src / "notes.txt").write_text("not a photo\n")
    dst = tmp_path / "br"
    proc = run_script(SCRIPT, "--src", tmp_path / "train", "--dst", dst, *MODEL, check=1)
    assert "corrupt.jpg" in proc.stderr and "notes.txt" in proc.stderr
    assert "2 input file(s) skipped" in proc.stderr
    names = {"gray", "palette", "rgba", "cmyk", "sixteen", "webp", "bmp", "tiff", "rotated"}
    assert {p.stem for p in (dst / "cat").glob("*.png")} == names
    assert Image.open(dst / "cat" / "rotated.png").size == (60, 80)  # EXIF orientation applied


def test_name_collision_is_an_error(tmp_path):
    src = tmp_path / "train" / "cat"
    src.mkdir(parents=True)
    photo("chelsea").save(src / "a.jpg")
    photo("chelsea").save(src / "a.png")
    proc = run_script(SCRIPT, "--src", tmp_path / "train", "--dst", tmp_path / "br", *MODEL, check=2)
    assert "a.jpg" in proc.stderr and "a.png" in proc.stderr and "same output" in proc.stderr
    assert pngs(tmp_path / "br") == []


def test_killed_run_leaves_no_partial_file(tmp_path):
    # three classes whose 64 px crops always hold an object (a thin rocket may not)
    train = write_photo_set(tmp_path / "train", per_class=5, size=64, classes=["astronaut", "chelsea", "coffee"])
    dst = tmp_path / "br"
    cmd = [sys.executable, str(REPO / SCRIPT), "--src", str(train), "--dst", str(dst), *MODEL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(pngs(dst)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = pngs(dst)
    assert 3 <= len(done) < 15
    for rel in done:  # whatever is visible is whole; a killed write is only a hidden temporary
        Image.open(dst / rel).load()
    rerun = run_script(SCRIPT, "--src", train, "--dst", dst, *MODEL, check=0)
    assert f"skipped as existing {len(done)}" in rerun.stdout
    assert len(pngs(dst)) == 15 and temps(dst) == []


def test_blank_image_is_degenerate(tmp_path):
    train, dst = tmp_path / "train", tmp_path / "br"
    (train / "blank").mkdir(parents=True)
    (train / "cat").mkdir()
    Image.new("RGB", (64, 64), "white").save(train / "blank" / "white.png")
    photo("chelsea").save(train / "cat" / "cat.jpg")
    proc = run_script(SCRIPT, "--src", train, "--dst", dst, *MODEL, check=1)
    assert "white.png" in proc.stderr and "no object found" in proc.stderr
    assert "degenerate 1" in proc.stdout
    assert pngs(dst) == [Path("cat/cat.png")] and (dst / "blank").is_dir()  # class folder kept

    refused = run_script(SCRIPT, "--src", train, "--dst", dst, *MODEL, "--fallback", "copy", check=2)
    assert "fallback: skip -> copy" in refused.stderr  # the old outputs were made otherwise: not kept silently
    proc = run_script(SCRIPT, "--src", train, "--dst", dst, *MODEL, "--fallback", "copy", "--fresh", check=0)
    assert "removed 1 earlier output(s)" in proc.stdout and "original copied" in proc.stderr
    assert (np.asarray(Image.open(dst / "blank" / "white.png")) == 255).all()


def test_list_models_shows_u2netp_available():
    proc = run_script(SCRIPT, "--list-models", check=0)
    line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["u2netp"])
    assert "available offline" in line


def test_model_not_available_offline(tmp_path, monkeypatch):
    # A dead proxy makes the download fail at once, even on a machine with internet.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    train = tmp_path / "train" / "cat"
    train.mkdir(parents=True)
    photo("chelsea").save(train / "cat.jpg")
    proc = run_script(SCRIPT, "--src", tmp_path / "train", "--dst", tmp_path / "br", check=2)  # u2net
    assert "--model u2netp" in proc.stderr
    assert not (tmp_path / "br").exists()  # a refused run leaves no folder: no class folders, no log.txt


def test_refuses_held_out_and_missing_source(tmp_path):
    val = tmp_path / "data" / "val" / "cat"
    val.mkdir(parents=True)
    photo("chelsea").save(val / "cat.jpg")
    proc = run_script(SCRIPT, "--src", tmp_path / "data" / "val", "--dst", tmp_path / "br", *MODEL, check=2)
    assert "held-out" in proc.stderr
    proc = run_script(SCRIPT, "--src", tmp_path / "nowhere", "--dst", tmp_path / "br", *MODEL, check=2)
    assert "not found" in proc.stderr


def test_parse_color():
    assert parse_color("white") == (255, 255, 255) and parse_color("gray") == (128, 128, 128)
    assert parse_color(" 1,2,3 ") == (1, 2, 3)
    for bad in ("purple", "1,2", "0,0,256"):
        with pytest.raises(Exception):
            parse_color(bad)


def test_an_unsure_mask_is_a_ghost_and_refused():
    yy, xx = np.mgrid[:100, :100]
    disk = (yy - 50) ** 2 + (xx - 50) ** 2 < 30 ** 2
    sharp = np.where(disk, 255, 0).astype(np.uint8)
    ghost = np.where(disk, 160, 0).astype(np.uint8)  # half-transparent everywhere: passes the area guard
    opt = Namespace(min_fg=0.02, max_fg=0.98, min_confidence=0.5)
    assert mask_confidence(sharp) == 1.0 and mask_confidence(ghost) == 0.0
    assert unusable_mask(sharp, opt) is None
    assert "unsure mask" in unusable_mask(ghost, opt) and "ghost" in unusable_mask(ghost, opt)
    assert unusable_mask(ghost, Namespace(**{**vars(opt), "min_confidence": 0.0})) is None  # 0: check off
    assert "no object found" in unusable_mask(np.zeros((100, 100), np.uint8), opt)


def test_min_confidence_refuses_real_masks_by_name(tmp_path):
    train, dst = tmp_path / "train", tmp_path / "br"
    (train / "cat").mkdir(parents=True)
    photo("chelsea").save(train / "cat" / "cat.jpg")
    # every real mask has a soft edge band, so no mask is 100 % sure
    proc = run_script(SCRIPT, "--src", train, "--dst", dst, *MODEL, "--min-confidence", "1", "--fallback", "copy",
                      check=0)
    note = next(line for line in proc.stderr.splitlines() if "cat.jpg" in line)
    assert note.startswith("copied: ") and "unsure mask" in note and "original copied" in note
    assert pngs(dst) == [Path("cat/cat.png")]

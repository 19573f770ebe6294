"""make_cutmix.py: counts, manifest vs pixels, determinism, resume/refusal, leakage, bad inputs.

Most cases call make_cutmix.main in this process (each script start pays ~2 s of imports);
a few run the script as a user does, to cover its exit codes end to end.
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_script, write_photo_set

import make_cutmix
from smalldata.cli import UsageError
from smalldata.images import open_rgb, resize_square

SIZE = 32  # output side: small keeps every test fast


def ocm(*args):
    """make_cutmix.main(argv) in-process, with main_wrapper's mapping of UsageError to exit 2."""
    try:
        return make_cutmix.main([str(a) for a in args])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse
        return e.code


@pytest.fixture
def train(tmp_path):
    """data/train: four classes of three 48 px JPEG photos each."""
    return write_photo_set(tmp_path / "data" / "train", per_class=3, size=48, seed=3)


def outputs(dst):
    """{relative path: bytes} of everything in dst (images, manifest, args file), but the run log and the
    completion record, which hold times."""
    return {p.relative_to(dst).as_posix(): p.read_bytes() for p in sorted(Path(dst).rglob("*"))
            if p.is_file() and p.name not in ("log.txt", "complete.json")}


def manifest(dst):
    with open(Path(dst) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def per_class(dst):
    return {d.name: len(list(d.glob("ocm_*.png"))) for d in Path(dst).iterdir() if d.is_dir()}


def test_counts_layout_and_manifest_match_pixels(train, tmp_path):
    dst = tmp_path / "ocm"
    assert ocm("--src", train, "--dst", dst, "--count", 10, "--img-size", SIZE) == 0
    counts = per_class(dst)
    assert sorted(counts.values()) == [2, 2, 3, 3] and set(counts) == {d.name for d in train.iterdir()}

    rows = manifest(dst)
    assert [r["file"] for r in rows] == [f"{r['class']}/ocm_{i:05d}.png" for i, r in enumerate(rows)]
    assert {r["file"] for r in rows} == {p.relative_to(dst).as_posix() for p in dst.glob("*/ocm_*.png")}
    for r in rows:
        out = np.asarray(Image.open(dst / r["file"]).convert("RGB"))
        assert out.shape == (SIZE, SIZE, 3)
        base, patch = Path(r["base_image"]), Path(r["patch_image"])
        assert base != patch and base.parent.name == patch.parent.name == r["class"]
        a = np.asarray(resize_square(open_rgb(base), SIZE))
        b = np.asarray(resize_square(open_rgb(patch), SIZE))
        x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 <= x1 <= SIZE and 0 <= y0 <= y1 <= SIZE
        inside = np.zeros((SIZE, SIZE), bool)
        inside[y0:y1, x0:x1] = True
        assert np.array_equal(out[inside], b[inside]) and np.array_equal(out[~inside], a[~inside])
        assert float(r["lambda"]) == pytest.approx(1 - inside.sum() / SIZE**2, abs=1e-6)


def test_same_seed_gives_identical_bytes(train, tmp_path):
    for name in ("one", "two"):
        assert ocm("--src", train, "--dst", tmp_path / name, "--count", 6, "--img-size", SIZE, "--seed", 7) == 0
    one = outputs(tmp_path / "one")
    assert len(one) == 6 + 2 and one == outputs(tmp_path / "two")
    assert ocm("--src", train, "--dst", tmp_path / "three", "--count", 6, "--img-size", SIZE, "--seed", 8) == 0
    assert outputs(tmp_path / "three")["manifest.csv"] != one["manifest.csv"]


def test_resume_skips_and_different_arguments_are_refused(train, tmp_path, capfd):
    dst = tmp_path / "ocm"
    args = ["--src", train, "--dst", dst, "--count", 8, "--img-size", SIZE]
    assert ocm(*args) == 0
    before = outputs(dst)
    for p in sorted(dst.glob("*/ocm_*.png"))[:3]:
        p.unlink()
    (dst / "manifest.csv").unlink()
    capfd.readouterr()
    assert ocm(*args) == 0
    assert "5 of 8 OCM images already in" in capfd.readouterr().out
    assert outputs(dst) == before

    assert ocm(*args, "--seed", 1) == 2  # another run would mix into this folder
    err = capfd.readouterr().err
    assert "seed 0 -> 1" in err and "--overwrite" in err
    assert outputs(dst) == before

    (train / "coffee" / "coffee_000.jpg").unlink()  # same arguments, changed sources
    assert ocm(*args) == 2
    assert "source files" in capfd.readouterr().err

    (dst / "notes.txt").write_text("mine")  # --overwrite clears only what the script made
    assert ocm(*args, "--seed", 1, "--overwrite") == 0
    assert json.loads((dst / "ocm_args.json").read_text())["seed"] == 1
    assert (dst / "notes.txt").read_text() == "mine" and sum(per_class(dst).values()) == 8


def test_foreign_files_in_dst_are_refused(train, tmp_path):
    dst = tmp_path / "ocm"
    (dst / "coffee").mkdir(parents=True)
    (dst / "coffee" / "photo.jpg").write_bytes(b"someone else's")
    assert ocm("--src", train, "--dst", dst, "--count", 4, "--img-size", SIZE) == 2
    assert ocm("--src", train, "--dst", dst, "--count", 4, "--img-size", SIZE, "--overwrite") == 0
    assert (dst / "coffee" / "photo.jpg").exists()


def test_one_photo_class_is_warned_and_its_share_moves(train, tmp_path, capfd):
    for p in sorted((train / "rocket").iterdir())[1:]:
        p.unlink()
    dst = tmp_path / "ocm"
    assert ocm("--src", train, "--dst", dst, "--count", 10, "--img-size", SIZE) == 0
    assert "class rocket has 1 usable photo" in capfd.readouterr().err
    counts = per_class(dst)
    assert counts["rocket"] == 0  # the folder exists: data/ocm must hold data/train's classes
    assert sorted(counts.values()) == [0, 3, 3, 4]


def test_held_out_source_is_refused(tiny_data, tmp_path):
    proc = run_script("make_cutmix.py", "--src", tiny_data / "val", "--dst", tmp_path / "ocm", check=2)
    assert "leak" in proc.stderr
    assert not (tmp_path / "ocm").exists()


def test_sources_must_share_classes_and_are_pooled(train, tmp_path, capfd):
    br = tmp_path / "data" / "br"
    for p in train.rglob("*.jpg"):  # stand-in for background-removed copies: same stems, PNG
        (br / p.parent.name).mkdir(parents=True, exist_ok=True)
        open_rgb(p).save(br / p.parent.name / f"{p.stem}.png")
    dst = tmp_path / "ocm"
    assert ocm("--src", train, "--src", br, "--dst", dst, "--count", 40, "--img-size", SIZE) == 0
    rows = manifest(dst)
    assert all(Path(r["base_image"]).stem != Path(r["patch_image"]).stem for r in rows)  # never its own copy
    assert any("/br/" in r["base_image"] + r["patch_image"] for r in rows)

    for p in (br / "rocket").iterdir():
        p.unlink()
    (br / "rocket").rmdir()
    assert ocm("--src", train, "--src", br, "--dst", tmp_path / "ocm2") == 2
    assert "lacks rocket" in capfd.readouterr().err


def test_corrupt_input_is_named_and_left_out(train, tmp_path):
    bad = train / "chelsea" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dst = tmp_path / "ocm"
    proc = run_script("make_cutmix.py", "--src", train, "--dst", dst, "--count", 8, "--img-size", SIZE, check=1)
    assert str(bad) in proc.stderr and "1 input file(s) skipped" in proc.stderr
    rows = manifest(dst)
    assert len(rows) == 8 and not any("broken" in r["base_image"] + r["patch_image"] for r in rows)


def test_class_folder_linking_out_of_dst_is_refused(train, tmp_path):
    dst, elsewhere = tmp_path / "ocm", tmp_path / "elsewhere"
    dst.mkdir()
    elsewhere.mkdir()
    (dst / "coffee").symlink_to(elsewhere, target_is_directory=True)
    assert ocm("--src", train, "--dst", dst, "--count", 4, "--img-size", SIZE) == 2
    assert not any(elsewhere.iterdir())


def test_preview_writes_png(train, tmp_path):
    sheet = tmp_path / "preview.png"
    assert ocm("--src", train, "--dst", tmp_path / "ocm", "--count", 5, "--img-size", SIZE,
               "--preview", sheet, "--preview-rows", 3) == 0
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.height > img.width  # three rows of three cells


def test_help():
    proc = run_script("make_cutmix.py", "--help", check=0)
    for flag in ("--src", "--dst", "--count", "--img-size", "--alpha", "--seed", "--overwrite", "--preview"):
        assert flag in proc.stdout

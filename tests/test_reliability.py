"""Reliability: faults (SIGKILL, full disk), bad inputs and hostile files, tried on the five scripts.

Every test records what it tried and what it saw with the `reliability` fixture (tests/reliability_report.py);
the README's Reliability table is made from those rows. Kills and full disks run the scripts as processes.
Refusals and bad-input runs of the torch scripts call the script in this process with runpy: the same
`cli.run(main)` a user's command runs, without the ~10 s of CPU that importing torch costs here.
The kill and resume runs train resnet18 (45 MB per checkpoint, the same code path as vgg13_bn's 0.5 GB);
the full-disk checkpoint test uses vgg13_bn itself.
"""
import contextlib
import csv
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_here, run_script, skimage_photos, write_photo_set
from smalldata import checkpoint
from smalldata.files import TEMP_MARK
from smalldata.images import open_rgb, resize_square
from smalldata.model import build_model

pytest_plugins = ["reliability_report"]

BR, OCM, S1, S2, SCORE = "make_remove_background.py", "make_cutmix.py", "model_1e-4.py", "model_1e-7_ep20.py", \
    "check_score.py"
U2NETP = ("--model", "u2netp", "--min-confidence", "0")  # small photos: u2netp is unsure of most
BR_CLASSES = ["astronaut", "chelsea", "coffee"]  # their 64 px crops always hold an object (a thin rocket may not)
OCM_ARGS = ("--count", "200", "--img-size", "64", "--seed", "0")
TWO = ["chelsea", "coffee"]
TRAIN = ("--arch", "resnet18", "--epochs", "3", "--img-size", "32", "--batch-size", "8", "--weights", "none",
         "--device", "cpu", "--deterministic", "--no-br", "--no-ocm")
TIMING = ("seconds", "images_per_s")


# ------------------------------------------------------------------------------------------ helpers

def train_here(script, *args):
    """run_here for a training run that must succeed, leaving torch's global switches as they were."""
    det = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        r = run_here(script, *args)
    finally:
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def temps(root, prefix=""):
    """Temporaries of the atomic writer (.<name>.tmp-*) anywhere under root, of names starting with prefix."""
    return sorted(p for p in Path(root).rglob(f".{prefix}*{TEMP_MARK}*"))


def visible(root, pattern="*"):
    """Files under root that a later step would read: not hidden, not inside hidden folders (and not the
    run's log.txt, which every run appends to under its own time stamp, nor the completion record, which
    holds the times of the files: checked on its own)."""
    root = Path(root)
    return sorted(p.relative_to(root) for p in root.rglob(pattern) if p.is_file()
                  and p.name not in ("log.txt", "complete.json")
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def tree(root):
    """{relative path: bytes} of every visible file under root."""
    return {rel.as_posix(): (Path(root) / rel).read_bytes() for rel in visible(root)}


def snapshot(root, skip):
    """Every path under root (except below `skip`) with its size and mtime: what a run must leave alone."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != Path(skip)]
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath, name))
            out[str(Path(dirpath, name))] = (st.st_size, st.st_mtime_ns)
    return out


def kill_when(ready, script, *args, log, timeout=300):
    """Start the script and SIGKILL it the moment ready() holds; False when it ended first."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
        end = time.time() + timeout
        try:
            while time.time() < end:
                if ready():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return True
                if proc.poll() is not None:
                    return False
                time.sleep(0.0005)
            raise AssertionError(f"{script} neither ended nor reached the kill point in {timeout} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def kill_during_write(root, script, *args, log, prefix="", tries=3):
    """SIGKILL the script while one of its temporaries exists under root; returns what it left behind."""
    for _ in range(tries):  # a small file's write may end between two polls; then try again
        assert kill_when(lambda: temps(root, prefix), script, *args, log=log), f"{script} ended before writing"
        left = temps(root, prefix)
        if left:
            return left
    raise AssertionError(f"{script}: no kill landed inside a write in {tries} tries")


def writing(left):
    """The names of the files whose writes a kill interrupted, from their temporaries."""
    return ", ".join(p.name[1:].split(TEMP_MARK)[0] for p in left)


def stderr_line(text, name):
    """The line that names `name`, from there on, folders of absolute paths dropped: what the user is told."""
    line = next((ln for ln in text.splitlines() if name in ln), "")
    line = line.split(name, 1)[-1].lstrip(": ").strip()
    return re.sub(r"(?:/[^/\s'\":]+)+/", "", line)[:110]


def rows_without_timing(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def flat_tensors(obj, prefix=""):
    """{dotted path: tensor} of every tensor in nested dicts and lists."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def same_tensors(a, b):
    a, b = flat_tensors(a), flat_tensors(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def tiny_disk(path, size):
    """A tmpfs of `size` mounted at path (root only); skips the test where it cannot be mounted."""
    path.mkdir(parents=True)
    if not shutil.which("mount"):
        pytest.skip("no mount command here, so no small file system to fill")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs to fill ({r.stderr.strip() or 'mount failed'}): needs root "
                    "with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def small_checkpoint(path, classes, arch="resnet18"):
    """A contract checkpoint of a freshly initialised (seeded) model."""
    torch.manual_seed(0)
    checkpoint.save(checkpoint.make(checkpoint.model_state(build_model(arch, len(classes))), arch=arch,
                                    classes=classes, img_size=32, mean=[0.485, 0.456, 0.406],
                                    std=[0.229, 0.224, 0.225], epoch=1, metrics={}, args={}), path)
    return path


# ------------------------------------------------------------------------------------------ shared runs

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """train/: three classes of three 64 px photos, for BR and OCM."""
    return write_photo_set(tmp_path_factory.mktemp("photos") / "train", per_class=3, size=64, seed=1,
                           classes=BR_CLASSES)


@pytest.fixture(scope="module")
def br_reference(photos, tmp_path_factory):
    dst = tmp_path_factory.mktemp("br_ref") / "br"
    run_script(BR, "--src", photos, "--dst", dst, *U2NETP, check=0)
    return tree(dst)


@pytest.fixture(scope="module")
def ocm_reference(photos, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ocm_ref") / "ocm"
    run_script(OCM, "--src", photos, "--dst", dst, *OCM_ARGS, check=0)
    return tree(dst)


def two_class_data(data, per_class):
    """data/train (per_class photos of each of TWO classes, 40 px) and data/val (one each)."""
    write_photo_set(data / "train", per_class=per_class, size=40, seed=1, classes=TWO)
    write_photo_set(data / "val", per_class=1, size=40, seed=2, classes=TWO)
    return data


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """data/train (2 classes x 4 photos: one batch of 8) and data/val (1 each)."""
    data = tmp_path_factory.mktemp("tdata") / "data"
    two_class_data(data, per_class=4)
    return data


@pytest.fixture(scope="module")
def stage1_reference(train_data, tmp_path_factory):
    """An uninterrupted 3-epoch stage 1 run in deterministic CPU mode (in this process: no torch import),
    keeping every epoch's weights to compare with."""
    out = tmp_path_factory.mktemp("s1_ref") / "ck"
    train_here(S1, "--data", train_data, "--out", out, *TRAIN, "--keep-all")
    return out


# ------------------------------------------------------------------------------------------ faults: kills

def test_br_killed_early_midway_and_mid_write_then_rerun_equals_an_uninterrupted_run(
        photos, br_reference, tmp_path, reliability):
    dst, log = tmp_path / "br", tmp_path / "log"
    args = ("--src", photos, "--dst", dst, *U2NETP)

    def whole_so_far(when):
        done = tree(dst)  # a visible file is a finished one: byte for byte the reference's
        assert all(br_reference[k] == v for k, v in done.items()), when
        reliability("fault", f"SIGKILL {when}", BR, f"{len(done)} of 9 outputs visible, all whole; "
                                                     f"hidden temporaries left: {len(temps(dst))}")

    assert kill_when(lambda: dst.is_dir(), BR, *args, log=log)  # early: before the first output
    whole_so_far("early (before any output)")
    assert kill_when(lambda: len(visible(dst, "*.png")) >= 4, BR, *args, log=log)
    whole_so_far("midway (after 4 of 9 outputs)")
    left = kill_during_write(dst, BR, *args, log=log)
    whole_so_far(f"during a file write ({writing(left)})")

    rerun = run_script(BR, *args, check=0)
    assert tree(dst) == br_reference and temps(dst) == []
    reliability("fault", "rerun after the three kills", BR,
                f"exit 0 ({stderr_line(rerun.stdout, 'summary:').split(';')[0]}); outputs byte-identical to an "
                "uninterrupted run; temporaries cleared")


def test_ocm_killed_early_midway_and_mid_write_then_rerun_equals_an_uninterrupted_run(
        photos, ocm_reference, tmp_path, reliability):
    dst, log = tmp_path / "ocm", tmp_path / "log"
    args = ("--src", photos, "--dst", dst, *OCM_ARGS)

    def whole_so_far(when):
        done = tree(dst)
        assert all(ocm_reference[k] == v for k, v in done.items()), when
        reliability("fault", f"SIGKILL {when}", OCM, f"{len(visible(dst, 'ocm_*.png'))} of 200 images visible, "
                                                      f"all whole; hidden temporaries left: {len(temps(dst))}")

    assert kill_when(lambda: dst.is_dir(), OCM, *args, log=log)
    whole_so_far("early (output folder just made)")
    assert kill_when(lambda: len(visible(dst, "ocm_*.png")) >= 20, OCM, *args, log=log)
    whole_so_far("midway (after 20 of 200 images)")
    left = kill_during_write(dst, OCM, *args, log=log, prefix="ocm_0")  # an image, not ocm_args.json
    whole_so_far(f"during a file write ({writing(left)})")

    run_script(OCM, *args, check=0)
    assert tree(dst) == ocm_reference and temps(dst) == []  # images, manifest.csv and ocm_args.json
    reliability("fault", "rerun after the three kills", OCM,
                "exit 0; images, manifest and args file byte-identical to an uninterrupted run")


def assert_same_training(out, ref, stage, kept):
    """Same metrics rows (timing columns aside) and the same tensors in every checkpoint kept."""
    assert rows_without_timing(out / stage / "metrics.csv") == rows_without_timing(ref / stage / "metrics.csv")
    for name in kept:
        a, b = torch.load(out / name, weights_only=True), torch.load(ref / name, weights_only=True)
        assert same_tensors(a["model"], b["model"]), name
        if "optimizer" in a:
            assert same_tensors(a["optimizer"], b["optimizer"]), name
    assert temps(out) == []
    for rel in visible(out, "*.pth"):  # every visible checkpoint opens
        checkpoint.load(out / rel)


def test_stage1_killed_early_mid_epoch_and_mid_checkpoint_save_then_rerun_equals_an_uninterrupted_run(
        train_data, stage1_reference, tmp_path, reliability):
    out, log = tmp_path / "ck", tmp_path / "log"
    args, stage = ("--data", train_data, "--out", out, *TRAIN), out / "stage1"

    assert kill_when(lambda: stage.is_dir(), S1, *args, log=log)  # training has just begun
    assert visible(out, "*.pth") == []
    reliability("fault", "SIGKILL early (first epoch running)", S1, "no checkpoint yet, nothing visible")

    t0 = time.time()  # epoch 1 recorded by this run: epoch 2 under way
    assert kill_when(lambda: (stage / "metrics.csv").is_file() and (stage / "metrics.csv").stat().st_mtime > t0,
                     S1, *args, log=log)
    for rel in visible(out, "*.pth"):
        checkpoint.load(out / rel)
    reliability("fault", "SIGKILL mid-run (epoch 1 recorded, epoch 2 training)", S1,
                f"visible: {', '.join(p.as_posix() for p in visible(out)) or 'nothing'}; every .pth opens")

    # during a save: a newer last.pth is being written while an older one exists
    assert kill_when(lambda: (stage / "last.pth").exists() and list(stage.glob(f".last.pth{TEMP_MARK}*")),
                     S1, *args, log=log)
    assert list(stage.glob(f".last.pth{TEMP_MARK}*")), "the kill landed after the save ended"
    last = checkpoint.load(stage / "last.pth")  # the previous one, whole
    epoch = last["epoch"]
    assert 1 <= epoch <= 3 and len(last["history"]) == epoch
    assert same_tensors(last["model"], torch.load(stage1_reference / f"stage1/epochs/epoch_{epoch:03d}.pth",
                                                  weights_only=True)["model"])
    reliability("fault", "SIGKILL during a last.pth save", S1,
                f"partial save left only as a hidden temporary; previous last.pth intact (epoch {epoch}, "
                "weights equal the uninterrupted run's)")

    rerun = run_script(S1, *args, check=0)  # the same command continues the interrupted run
    assert f"resuming after epoch {epoch}" in rerun.stdout
    assert_same_training(out, stage1_reference, "stage1",
                         ["stage1/last.pth", "stage1/best.pth", "divergence.pth",
                          *[p.relative_to(out).as_posix() for p in sorted((out / "stage1/epochs").glob("epoch_*.pth"))]])
    reliability("fault", "rerun (same command) after the three kills", S1,
                f"exit 0, resumed after epoch {epoch}; metrics rows (timing aside), last/best/divergence/epoch "
                "checkpoint tensors (weights and Adam state) identical to an uninterrupted run")


def test_stage1_killed_while_divergence_pth_is_written_gets_it_on_rerun(
        train_data, stage1_reference, tmp_path, reliability):
    # The state such a kill leaves, made exactly: the finished run's files, divergence.pth only a temporary.
    out = tmp_path / "ck"
    shutil.copytree(stage1_reference, out, copy_function=os.link)  # links: atomic writes never touch them
    (out / "divergence.pth").unlink()
    (out / f".divergence.pth{TEMP_MARK}4242-deadbeef").write_bytes(b"PK\x03\x04 half a checkpoint")
    rerun = run_here(S1, "--data", train_data, "--out", out, *TRAIN)
    outcome = (f"exit {rerun.returncode}; divergence.pth "
               f"{'rebuilt' if (out / 'divergence.pth').exists() else 'MISSING'} ('already finished' in output: "
               f"{'already finished' in rerun.stdout}); stale temporary {'left' if temps(out) else 'removed'}")
    reliability("fault", "SIGKILL while divergence.pth is copied (end of a run)", S1, outcome)
    assert rerun.returncode == 0 and (out / "divergence.pth").exists() and temps(out) == []
    assert same_tensors(checkpoint.load(out / "divergence.pth")["model"],
                        checkpoint.load(stage1_reference / "divergence.pth")["model"])


def test_stage2_killed_mid_checkpoint_save_then_resume_equals_an_uninterrupted_run(
        train_data, stage1_reference, tmp_path, reliability):
    init = stage1_reference / "divergence.pth"
    common = ("--data", train_data, "--init", init, "--epochs", "2", "--batch-size", "8", "--device", "cpu",
              "--deterministic", "--no-br", "--no-ocm")
    ref, out, log = tmp_path / "ref", tmp_path / "ck", tmp_path / "log"
    train_here(S2, *common, "--out", ref)

    stage = out / "stage2"
    assert kill_when(lambda: (stage / "last.pth").exists() and list(stage.glob(f".last.pth{TEMP_MARK}*")),
                     S2, *common, "--out", out, log=log)
    last = checkpoint.load(stage / "last.pth")
    assert last["epoch"] in (1, 2) and not last["finished"]
    reliability("fault", "SIGKILL during a last.pth save", S2,
                f"previous last.pth intact (epoch {last['epoch']}); partial save only a hidden temporary")

    r = run_script(S2, *common, "--out", out, "--resume", stage / "last.pth", check=0)
    assert f"resuming after epoch {last['epoch']}" in r.stdout
    assert_same_training(out, ref, "stage2", ["stage2/last.pth", "final.pth"])
    reliability("fault", "--resume last.pth after the kill", S2,
                "exit 0; metrics rows (timing aside), last.pth and final.pth tensors identical to an "
                "uninterrupted run")


@pytest.fixture(scope="module")
def score_setup(tmp_path_factory):
    """A seeded resnet18 checkpoint of two classes and a labelled folder of three photos each."""
    root = tmp_path_factory.mktemp("score")
    val = write_photo_set(root / "val", per_class=3, size=40, seed=5, classes=TWO)
    ckpt = small_checkpoint(root / "model.pth", TWO)
    return ckpt, val


def test_check_score_killed_midway_and_mid_write_then_rerun_equals_an_uninterrupted_run(
        score_setup, tmp_path, reliability):
    ckpt, val = score_setup
    ref, out, log = tmp_path / "ref" / "val", tmp_path / "score" / "val", tmp_path / "log"  # (--out/<scored folder>)
    args = ("--checkpoint", ckpt, "--data", val, "--device", "cpu")
    assert run_here(SCORE, *args, "--out", ref.parent).returncode == 0

    assert kill_when(lambda: (out / "score.json").exists(), SCORE, *args, "--out", out.parent, log=log)
    reliability("fault", "SIGKILL midway (after score.json)", SCORE,
                f"visible: {', '.join(p.name for p in visible(out))}; all whole")
    left = kill_during_write(out, SCORE, *args, "--out", out.parent, log=log)
    for rel in visible(out):
        if rel.suffix == ".png":
            Image.open(out / rel).load()
        else:
            assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel
    reliability("fault", f"SIGKILL during a file write ({writing(left)})", SCORE,
                "visible files whole; the partial one only a hidden temporary")

    run_script(SCORE, *args, "--out", out.parent, check=0)
    for name in ("score.json", "predictions.csv", "per_class.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    for name in ("confusion.png", "mistakes.png"):
        Image.open(out / name).load()
    assert temps(out) == [] and sorted(visible(out)) == sorted(visible(ref))
    reliability("fault", "rerun after the kills", SCORE,
                "exit 0; score.json, predictions.csv, per_class.csv identical to an uninterrupted run; "
                "no temporaries")


# ------------------------------------------------------------------------------------------ faults: full disk

def full_disk_outcome(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "disk full" in proc.stderr and "No space left" in proc.stderr and "Traceback" not in proc.stderr
    return f"exit 2: {stderr_line(proc.stderr, 'error:')[:90]}..."


@pytest.mark.parametrize("script, size", [(OCM, "256k"), (BR, "16k")], ids=[OCM, BR])
def test_a_full_disk_stops_cleanly_and_a_rerun_finishes_identically_once_there_is_room(
        script, size, photos, tmp_path, request, reliability):
    name, args = ("ocm", OCM_ARGS) if script == OCM else ("br", U2NETP)
    reference = request.getfixturevalue(f"{name}_reference")
    with tiny_disk(tmp_path / "disk", size) as disk:
        dst = disk / name
        proc = run_script(script, "--src", photos, "--dst", dst, *args)
        outcome = full_disk_outcome(proc)
        written = tree(dst)
        assert 0 < len(written) < len(reference) and temps(dst) == []
        assert all(reference[k] == v for k, v in written.items())
        reliability("fault", f"disk full ({size.upper()}B tmpfs)", script,
                    f"{outcome}; the {len(written)} files written before are intact; no temporary left")
        grow(disk, "8m")
        run_script(script, "--src", photos, "--dst", dst, *args, check=0)
        assert tree(dst) == reference
        reliability("fault", "rerun once the disk has room", script,
                    "exit 0; output identical to a run that never hit a full disk")


def test_checkpoint_save_on_a_full_disk_stops_with_a_message_and_leaves_no_partial_pth(
        tmp_path, reliability):
    data = tmp_path / "data"
    two_class_data(data, per_class=2)
    with tiny_disk(tmp_path / "disk", "2m") as disk:  # vgg13_bn: 0.5 GB per checkpoint
        proc = run_script(S1, "--data", data, "--out", disk / "ck", "--epochs", "1", "--img-size", "32",
                          "--batch-size", "8", "--weights", "none", "--device", "cpu", "--no-br", "--no-ocm")
        outcome = full_disk_outcome(proc)
        assert ".pth" in stderr_line(proc.stderr, "error:")  # names the file it could not write
        assert visible(disk, "*.pth") == [] and temps(disk) == []
        for rel in visible(disk):  # what did fit (metrics.csv, curves.png) is whole
            if rel.suffix == ".png":
                Image.open(disk / rel).load()
            elif rel.suffix == ".csv":
                assert rows_without_timing(disk / rel)
        reliability("fault", "disk full during a checkpoint save (2 MB tmpfs, vgg13_bn)", S1,
                    f"{outcome}; no traceback (writer thread included), no .pth or temporary left")


# ------------------------------------------------------------------------------------------ bad inputs

def png_bomb(path, side=30000):
    """A valid PNG header claiming side x side pixels (900 megapixels) with almost no data: 100 bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# name -> (what it is, words one of which its skip reason must hold, or None when it is a usable photo)
CORPUS = {
    "png_named.jpg": ("PNG with a .jpg name", None),
    "tiny_1x1.png": ("1x1 image", None),
    "sixteen_bit.png": ("16-bit grayscale PNG", None),
    "cmyk.jpg": ("CMYK JPEG", None),
    "palette_alpha.png": ("palette PNG with transparency", None),
    "exif_rot6.jpg": ("EXIF orientation 6 on a 96x72 photo", None),
    "gray.jpg": ("grayscale JPEG", None),
    "with spaces.jpg": ("file name with spaces", None),
    "ünïcødé 写真.jpg": ("non-ASCII file name", None),
    'comma, "quoted".jpg': ("file name with a comma and quotes", None),
    "empty.jpg": ("zero-byte file", ("empty file",)),
    "truncated.jpg": ("truncated JPEG", ("corrupt", "truncated")),
    "text.jpg": ("text file named .jpg", ("not an image",)),
    "bomb.png": ("decompression bomb (30000x30000 PNG header)", ("too many pixels", "safety limit")),
    "loop.jpg": ("symlink loop (a link to itself)", ("leads nowhere", "symbolic links")),
}
GOOD = [n for n, (_, why) in CORPUS.items() if why is None]
BAD = [n for n, (_, why) in CORPUS.items() if why is not None]
HIDDEN = [".DS_Store", "Thumbs.db"]
WHOLE = "exit 1: the run finished, every skip named, then the summary line"
SIDE = (96, 72)  # not square, so a rotation shows; big enough for u2netp to find the cat


def write_corpus(folder):
    """Every kind of file a photo folder may hold, in one class folder (plus a folder link back to itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(skimage_photos()["chelsea"]).resize(SIDE, Image.Resampling.BICUBIC)
    photo.save(folder / "png_named.jpg", format="PNG")
    photo.resize((1, 1)).save(folder / "tiny_1x1.png")
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(folder / "sixteen_bit.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(folder / "palette_alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    photo.save(folder / "exif_rot6.jpg", exif=exif)
    photo.convert("L").save(folder / "gray.jpg")
    for name in ("with spaces.jpg", "ünïcødé 写真.jpg", 'comma, "quoted".jpg'):
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((folder / "gray.jpg").read_bytes()[:400])
    (folder / "text.jpg").write_text("holiday notes, not a photo\n")
    png_bomb(folder / "bomb.png")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "again").symlink_to(".", target_is_directory=True)  # a folder loop: must not hang or repeat
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    return folder


def check_skips(proc, script, reliability, *, n_bad=len(BAD)):
    """Each bad file named on stderr with its reason; hidden files never mentioned; the summary line."""
    for name in BAD:
        label, why = CORPUS[name]
        said = stderr_line(proc.stderr, name)
        assert f"{name}:" in proc.stderr and any(w in said for w in why), (name, proc.stderr[-3000:])
        reliability("bad input", label, script, f"skipped, named: {said}")
    assert not any(h in proc.stderr + proc.stdout for h in HIDDEN)
    assert re.search(rf"\b{n_bad} (input|image) file\(s\) skipped \((the first \d+ )?named above", proc.stderr)
    reliability("bad input", "hidden files (.DS_Store, Thumbs.db)", script, "ignored without a word")
    reliability("bad input", "folder symlink loop (again -> .)", script, "no hang, no file counted twice")


def test_open_rgb_makes_every_usable_kind_upright_8_bit_rgb(tmp_path, reliability):
    folder = write_corpus(tmp_path / "c")
    for name in GOOD:
        img = open_rgb(folder / name)
        assert img.mode == "RGB"
        expect = {"exif_rot6.jpg": SIDE[::-1], "tiny_1x1.png": (1, 1)}.get(name, SIDE)
        assert img.size == expect, name
    px = np.asarray(open_rgb(folder / "palette_alpha.png"))
    assert (px == 255).all(axis=2).any()  # the transparent palette entry is composited onto white
    reliability("bad input", "every usable kind (PNG as .jpg, 1x1, 16-bit, CMYK, palette+alpha, EXIF 6, gray, "
                              "odd names)", "smalldata.images.open_rgb (all scripts)",
                "8-bit RGB; EXIF 6 turns 96x72 into 72x96; transparency on white")


def test_br_processes_every_usable_photo_and_names_every_bad_file(tmp_path, reliability):
    src, dst = tmp_path / "train", tmp_path / "br"
    write_corpus(src / "chelsea")
    (src / "empty_class").mkdir()
    proc = run_script(BR, "--src", src, "--dst", dst, *U2NETP)
    assert proc.returncode == 1
    check_skips(proc, BR, reliability, n_bad=len(BAD) + 1)  # + the 1x1 image, see below
    # 1x1: nothing to cut out, so it is "no object found", named like any other skip (past the first
    # Problems.SHOWN on the console: in the log and skipped.csv)
    said = stderr_line(proc.stderr + (dst / "log.txt").read_text(encoding="utf-8"), "tiny_1x1.png")
    assert "no object found" in said
    with open(dst / "skipped.csv", newline="", encoding="utf-8") as f:
        assert any(r["file"].endswith("tiny_1x1.png") and "no object found" in r["reason"] for r in csv.DictReader(f))
    reliability("bad input", "1x1 image", BR, f"skipped, named: {said[:70]}")
    for name in GOOD:
        if name == "tiny_1x1.png":
            continue
        out = Image.open(dst / "chelsea" / Path(name).with_suffix(".png"))
        assert out.mode == "RGB" and out.size == open_rgb(src / "chelsea" / name).size, name
    assert Image.open(dst / "chelsea" / "exif_rot6.png").size == SIDE[::-1]
    assert sorted(p.name for p in (dst / "chelsea").iterdir()) == sorted(
        Path(n).with_suffix(".png").name for n in GOOD if n != "tiny_1x1.png")
    reliability("bad input", "usable kinds (PNG as .jpg, 16-bit, CMYK, palette+alpha, gray, odd names)", BR,
                "written as RGB PNGs of the upright size")
    reliability("bad input", "EXIF-rotated JPEG (orientation 6)", BR, "output is 72x96 (rotation applied)")
    assert (dst / "empty_class").is_dir() and "empty_class" in stderr_line(proc.stderr, "warning: class folder")
    reliability("bad input", "empty class folder", BR,
                f"warned: {stderr_line(proc.stderr, 'warning: class folder')[:60]}...; its empty folder kept")
    reliability("bad input", "whole corpus", BR, WHOLE)


def test_ocm_uses_every_usable_photo_and_names_every_bad_file(tmp_path, reliability):
    src, dst = tmp_path / "train", tmp_path / "ocm"
    write_corpus(src / "chelsea")
    write_photo_set(src, per_class=2, size=40, seed=3, classes=["coffee"])
    (src / "empty_class").mkdir()
    proc = run_script(OCM, "--src", src, "--dst", dst, "--count", "60", "--img-size", "32")
    assert proc.returncode == 1
    check_skips(proc, OCM, reliability)
    with open(dst / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    used = {Path(r[k]).name for r in rows for k in ("base_image", "patch_image")}
    assert set(GOOD) <= used and not used & set(BAD)  # every usable photo drawn, odd names read back
    reliability("bad input", "usable kinds incl. 1x1 and odd names", OCM,
                "all drawn as base or patch; names round-trip through manifest.csv")
    # EXIF rotation applied: a mix whose base is the rotated photo matches the upright photo outside the box
    row = next(r for r in rows if Path(r["base_image"]).name == "exif_rot6.jpg")
    x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
    out = np.asarray(Image.open(dst / row["file"]).convert("RGB"))
    upright = np.asarray(resize_square(open_rgb(src / "chelsea" / "exif_rot6.jpg"), 32))
    outside = np.ones((32, 32), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(out[outside], upright[outside])
    reliability("bad input", "EXIF-rotated JPEG (orientation 6)", OCM, "mixed upright (pixels checked)")
    assert "empty_class" in stderr_line(proc.stderr, "warning: class") and (dst / "empty_class").is_dir()
    assert not list((dst / "empty_class").iterdir())
    reliability("bad input", "empty class folder", OCM,
                f"warned: {stderr_line(proc.stderr, 'warning: class')[:60]}...; gets no images")
    reliability("bad input", "whole corpus", OCM, WHOLE)


@pytest.fixture
def corpus_data(tmp_path):
    data = tmp_path / "data"
    write_corpus(data / "train" / "chelsea")
    write_photo_set(data / "train", per_class=2, size=40, seed=3, classes=["coffee"])
    write_photo_set(data / "val", per_class=1, size=40, seed=4, classes=TWO)
    return data


def test_training_trains_on_every_usable_photo_and_names_every_bad_file(corpus_data, tmp_path, reliability):
    r = run_here(S1, "--data", corpus_data, "--out", tmp_path / "ck", "--arch", "resnet18", "--epochs", "1",
                 "--img-size", "32", "--batch-size", "8", "--weights", "none", "--device", "cpu", "--no-br", "--no-ocm")
    assert r.returncode == 1, r.stderr[-3000:]
    check_skips(r, S1, reliability)
    assert f"images: train {len(GOOD) + 2}, val 2 at 32 px" in r.stdout  # no photo lost, none counted twice
    reliability("bad input", "usable kinds incl. 1x1 and odd names", S1,
                f"all {len(GOOD)} trained on (images: train {len(GOOD) + 2} = corpus + 2 others)")
    reliability("bad input", "whole corpus", S1, WHOLE)


def test_training_refuses_an_empty_class_and_a_val_class_missing_from_train(corpus_data, tmp_path, reliability):
    small = ("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-br", "--no-ocm")
    (corpus_data / "val" / "zebra").mkdir()
    Image.new("RGB", (20, 20), "gray").save(corpus_data / "val" / "zebra" / "z.png")
    init = small_checkpoint(tmp_path / "init.pth", TWO)
    for script, extra in ((S1, ("--arch", "resnet18", "--weights", "none")), (S2, ("--init", init))):
        r = run_here(script, "--data", corpus_data, "--out", tmp_path / "ck", *small, *extra)
        assert r.returncode == 2 and "zebra" in r.stderr and "Traceback" not in r.stderr
        reliability("bad input", "val class missing from train (val/zebra)", script,
                    f"exit 2: {stderr_line(r.stderr, 'error:')[:80]}...")
    shutil.rmtree(corpus_data / "val" / "zebra")
    (corpus_data / "train" / "empty_class").mkdir()
    r = run_here(S1, "--data", corpus_data, "--out", tmp_path / "ck", *small, "--arch", "resnet18",
                 "--weights", "none")
    assert r.returncode == 2 and "empty_class" in r.stderr
    reliability("bad input", "empty class folder in train", S1, f"exit 2: {stderr_line(r.stderr, 'error:')}")
    assert not (tmp_path / "ck").exists()


def test_check_score_scores_every_usable_photo_and_names_every_bad_file(tmp_path, reliability):
    val = tmp_path / "val"
    write_corpus(val / "chelsea")
    write_photo_set(val, per_class=2, size=40, seed=3, classes=["coffee"])
    ckpt = small_checkpoint(tmp_path / "m.pth", TWO)
    r = run_here(SCORE, "--checkpoint", ckpt, "--data", val, "--out", tmp_path / "score", "--device", "cpu")
    assert r.returncode == 1, r.stderr[-3000:]
    check_skips(r, SCORE, reliability)
    s = json.loads((tmp_path / "score" / "val" / "score.json").read_text())
    assert s["n"] == len(GOOD) + 2 and len(s["skipped"]) == len(BAD)
    with open(tmp_path / "score" / "val" / "predictions.csv", newline="", encoding="utf-8") as f:
        scored = {Path(row["file"]).name for row in csv.DictReader(f)}
    assert set(GOOD) <= scored
    reliability("bad input", "usable kinds incl. 1x1 and odd names", SCORE,
                f"all scored (n = {s['n']}); names round-trip through predictions.csv")
    reliability("bad input", "whole corpus", SCORE, WHOLE)


# ------------------------------------------------------------------------------------------ hostile files

class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile(kind, path, marker, classes, real=None):
    """Write a .pth of the given kind at path (`real`: a real checkpoint to cut in half)."""
    fields = dict(arch="resnet18", classes=classes, img_size=32, mean=[0.5] * 3, std=[0.5] * 3, epoch=1,
                  metrics={}, args={})
    if kind == "pickle payload (torch zip)":
        torch.save({"model": Payload(marker), **fields}, path)
    elif kind == "pickle payload (plain pickle)":
        with open(path, "wb") as f:
            pickle.dump({"model": Payload(marker), **fields}, f)
    elif kind == "a plain tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "half of a real checkpoint":
        with open(real, "rb") as f:
            path.write_bytes(f.read(real.stat().st_size // 2))
    elif kind == "zero-byte file":
        path.write_bytes(b"")
    elif kind == "fields of the wrong type":
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, **fields,
                    "img_size": "large", "classes": ",".join(classes), "mean": None}, path)
    elif kind == "weights that do not fit the arch":
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, **fields}, path)
    else:
        raise ValueError(kind)
    return path


LOADERS = {  # entry point -> the arguments around the checkpoint path (originals only: the data has no br, ocm)
    (S1, "--weights"): ("--arch", "resnet18", "--epochs", "1", "--img-size", "32", "--batch-size", "8",
                        "--device", "cpu", "--no-br", "--no-ocm", "--weights"),
    (S1, "--resume"): ("--arch", "resnet18", "--epochs", "1", "--img-size", "32", "--batch-size", "8",
                       "--device", "cpu", "--no-br", "--no-ocm", "--weights", "none", "--resume"),
    (S2, "--init"): ("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-br", "--no-ocm", "--init"),
    (S2, "--resume"): ("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-br", "--no-ocm", "--resume"),
    (SCORE, "--checkpoint"): ("--device", "cpu", "--checkpoint"),
}
PAYLOADS = ["pickle payload (torch zip)", "pickle payload (plain pickle)"]
FOREIGN = ["a plain tensor", "random bytes", "half of a real checkpoint", "zero-byte file",
           "fields of the wrong type", "weights that do not fit the arch"]


@pytest.fixture(scope="module")
def real_pth(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("real") / "real.pth", TWO)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("small") / "data"
    two_class_data(data, per_class=2)
    return data


def run_loader(loader, ckpt, data, out):
    script, _ = loader
    where = ("--data", data / "val") if script == SCORE else ("--data", data)
    return run_here(script, *where, "--out", out, *LOADERS[loader], ckpt)


@pytest.mark.parametrize("loader", list(LOADERS), ids=lambda x: f"{x[0]} {x[1]}")
@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(kind, loader, small_data, tmp_path,
                                                                       reliability):
    marker = tmp_path / "payload_ran"
    evil = hostile(kind, tmp_path / "evil.pth", marker, TWO)
    r = run_loader(loader, evil, small_data, tmp_path / "out")
    reliability("hostile file", kind, " ".join(loader),
                f"exit {r.returncode}: {stderr_line(r.stderr, 'error:')[:100]}...; payload "
                f"{'RAN' if marker.exists() else 'did not run'}")
    assert not marker.exists()
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or visible(tmp_path / "out") == []


@pytest.mark.parametrize("loader", list(LOADERS), ids=lambda x: f"{x[0]} {x[1]}")
@pytest.mark.parametrize("kind", FOREIGN)
def test_a_foreign_or_truncated_checkpoint_gives_a_clear_error(kind, loader, small_data, real_pth, tmp_path,
                                                               reliability):
    bad = hostile(kind, tmp_path / "foreign.pth", tmp_path / "marker", TWO, real_pth)
    r = run_loader(loader, bad, small_data, tmp_path / "out")
    said = stderr_line(r.stderr, "error:") or r.stderr.strip().splitlines()[-1][:90]
    reliability("hostile file", kind, " ".join(loader), f"exit {r.returncode}: {said[:100]}")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "foreign.pth" in said, said  # refused for the file itself, not for something else in the run
    assert not list(Path(tmp_path / "out").rglob("*.pth"))


def test_br_refuses_a_destination_class_folder_that_links_outside(photos, tmp_path, reliability):
    dst, outside = tmp_path / "br", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    (dst / "chelsea").symlink_to(outside, target_is_directory=True)
    r = run_script(BR, "--src", photos, "--dst", dst, *U2NETP)
    assert r.returncode == 2 and "outside" in r.stderr and not any(outside.iterdir())
    reliability("hostile file", "--dst class folder is a symlink to outside", BR,
                f"exit 2: {stderr_line(r.stderr, 'error:')[:80]}...; nothing written there")


def test_ocm_refuses_a_destination_class_folder_that_links_outside(photos, tmp_path, reliability):
    dst, outside = tmp_path / "ocm", tmp_path / "outside"
    dst.mkdir()
    outside.mkdir()
    (dst / "chelsea").symlink_to(outside, target_is_directory=True)
    r = run_here(OCM, "--src", photos, "--dst", dst, "--count", "6", "--img-size", "32")
    assert r.returncode == 2 and not any(outside.iterdir())
    reliability("hostile file", "--dst class folder is a symlink to outside", OCM,
                f"exit 2: {stderr_line(r.stderr, 'error:')[:80]}...; nothing written there")


@pytest.mark.parametrize("script", [BR, OCM])
def test_a_source_class_linked_from_elsewhere_writes_only_into_the_destination(script, tmp_path, reliability):
    src, dst, elsewhere = tmp_path / "train", tmp_path / "out", tmp_path / "elsewhere"
    write_photo_set(src, per_class=1, size=64, seed=1, classes=["chelsea"])
    write_photo_set(elsewhere, per_class=2, size=64, seed=2, classes=["coffee"])
    (src / "coffee").symlink_to(elsewhere / "coffee", target_is_directory=True)
    before = snapshot(tmp_path, skip=dst)
    extra = U2NETP if script == BR else ("--count", "4", "--img-size", "32")
    runner = run_script if script == BR else run_here  # BR imports no torch: a process of its own is cheap
    r = runner(script, "--src", src, "--dst", dst, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert snapshot(tmp_path, skip=dst) == before and not (dst / "coffee").is_symlink()
    reliability("hostile file", "source class folder is a symlink to a folder elsewhere", script,
                f"exit 0; outputs only under --dst ({len(visible(dst))} files); nothing else touched")


@pytest.mark.parametrize("script", [BR, OCM, SCORE])
def test_an_output_folder_inside_the_input_folder_is_refused(script, score_setup, photos, tmp_path, reliability):
    if script == SCORE:
        ckpt, val = score_setup
        inside = val / "chelsea" / "score"
        r = run_here(SCORE, "--checkpoint", ckpt, "--data", val, "--out", inside, "--device", "cpu")
        flag = "--out inside --data"
    else:
        inside = photos / "chelsea" / "generated"
        args = U2NETP if script == BR else ("--count", "4", "--img-size", "32")
        r = (run_script if script == BR else run_here)(script, "--src", photos, "--dst", inside, *args)
        flag = "--dst inside --src"
    assert r.returncode == 2 and "Traceback" not in r.stderr and not inside.exists()
    reliability("hostile file", flag, script, f"exit 2: {stderr_line(r.stderr, 'error:')[:80]}...; nothing written")


def test_training_refuses_an_output_folder_inside_the_data(small_data, tmp_path, reliability):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    inside = data / "train" / "ck"
    r = run_here(S1, "--data", data, "--out", inside, "--arch", "resnet18", "--epochs", "1", "--img-size", "32",
                 "--batch-size", "8", "--weights", "none", "--device", "cpu")
    written = len(visible(inside)) if inside.exists() else 0
    reliability("hostile file", "--out inside --data/train", S1,
                f"exit {r.returncode}; " + (f"{written} files written into the training data (a new 'class' for "
                                           "the next run)" if written else "refused; nothing written"))
    assert r.returncode == 2 and not inside.exists()

"""Finished means finished: BR and OCM mark a complete output last (complete.json); training takes data/br
and data/ocm only as their steps completed them, from the photos and classes it trains on, and refuses
anything else in one line naming the fix. Real rembg u2netp, real photos, the real scripts."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, mark_stand_in_complete, run_here, run_script, write_photo_set
from smalldata import records
from smalldata.cli import Problems, UsageError
from smalldata.data import load_training_data
from smalldata.folders import find_classes, scan_labelled

BR_ARGS = ("--model", "u2netp", "--min-confidence", "0", "--fallback", "copy")  # every photo gets an image
TRAIN = ("--arch", "resnet18", "--epochs", "1", "--img-size", "32", "--batch-size", "8", "--weights", "none",
         "--device", "cpu")
CLASSES = ["astronaut", "chelsea", "coffee"]


def problem(data, step):
    originals, classes = scan_labelled(data / "train")
    return records.check(data, step, classes, originals)


@pytest.fixture
def data(tmp_path):
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=4, size=64, seed=1, classes=CLASSES)
    write_photo_set(data / "val", per_class=1, size=64, seed=2, classes=CLASSES)
    return data


def br(data, *extra, check=0):
    return run_script("make_remove_background.py", "--src", data / "train", "--dst", data / "br", *BR_ARGS, *extra,
                      check=check)


def test_br_killed_midway_is_refused_by_stage_1_and_the_rerun_completes_it(data):
    cmd = [sys.executable, str(REPO / "make_remove_background.py"), "--src", str(data / "train"), "--dst",
           str(data / "br"), *BR_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list((data / "br").rglob("*.png"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "BR finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made = len(list((data / "br").rglob("*.png")))
    assert 3 <= made < 12 and not (data / "br" / records.RECORD).exists()

    r = run_here("model_1e-4.py", "--data", data, "--out", data.parent / "ck", *TRAIN, "--no-ocm")
    said = r.stderr.strip()
    assert r.returncode == 2 and len(said.splitlines()) == 1, r.stderr
    assert f"{data / 'br'} is unfinished" in said and "rerun the same command" in said and "--no-br" in said
    assert "decode" not in r.stdout + r.stderr and not (data.parent / "ck").exists()  # refused before any work

    rerun = br(data)
    assert f"skipped as existing {made}" in rerun.stdout
    assert problem(data, "br") is None
    record = records.read(data / "br")
    assert record["summary"] == {"photos": 12, "made": 12, "without an image": 0}
    assert record["asked"]["model"] == "u2netp" and record["classes"] == CLASSES
    assert sorted(record["sources"]) == ["train"] and len(record["sources"]["train"]) == len(record["made"]) == 12


def test_br_refused_offline_leaves_no_folder_and_stage_1_says_what_is_missing(data, monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):  # rembg's download fails at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    r = run_script("make_remove_background.py", "--src", data / "train", "--dst", data / "br", check=2)  # u2net
    assert "--model u2netp" in r.stderr and not (data / "br").exists()  # no class folders, no log.txt
    s1 = run_here("model_1e-4.py", "--data", data, "--out", data.parent / "ck", *TRAIN, "--no-ocm")
    assert s1.returncode == 2 and f"{data / 'br'} not found: make it with make_remove_background.py" in s1.stderr
    assert "--no-br" in s1.stderr


def test_every_way_br_output_goes_stale_is_refused_with_its_fix(data):
    br(data)
    assert problem(data, "br") is None

    photo = data / "train" / "chelsea" / "chelsea_001.jpg"
    os.utime(photo, ns=(time.time_ns(), time.time_ns()))  # touched: a new time, the same content
    assert problem(data, "br") is None
    photo.write_bytes((data / "train" / "chelsea" / "chelsea_000.jpg").read_bytes())  # changed after BR made its image
    assert "made from other photos than" in problem(data, "br") and "1 changed (e.g. chelsea/chelsea_001.jpg)" in \
        problem(data, "br")
    rerun = br(data)  # the same command remakes what is older than its photo
    assert "11 already done" in rerun.stdout and problem(data, "br") is None

    stray = data / "br" / "coffee" / "old.png"
    stray.write_bytes((data / "br" / "coffee" / "coffee_000.png").read_bytes())
    assert "has changed since make_remove_background.py completed it (1 added (e.g. coffee/old.png))" in \
        problem(data, "br")
    assert "from no file" in br(data).stderr and problem(data, "br") is not None  # warned, and still refused
    br(data, "--fresh")
    assert not stray.exists() and problem(data, "br") is None

    (data / "br" / "chelsea" / "chelsea_002.png").unlink()  # an image deleted by hand
    assert "1 removed" in problem(data, "br")
    write_photo_set(data / "train", per_class=1, size=64, seed=9, classes=["rocket"])  # another class
    assert "made for other classes" in problem(data, "br")


def test_ocm_is_complete_once_written_a_rerun_that_adds_nothing_completes_it_again_and_br_changes_stale_it(data):
    br(data)
    ocm = ["--src", data / "train", "--src", data / "br", "--dst", data / "ocm", "--count", "9", "--img-size", "32"]
    run_script("make_cutmix.py", *ocm, check=0)
    assert problem(data, "ocm") is None
    record = records.read(data / "ocm")
    assert sorted(record["sources"]) == ["br", "train"] and "manifest.csv" in record["made"]
    assert record["summary"]["images"] == 9 and record["asked"]["count"] == 9

    (data / "ocm" / records.RECORD).unlink()  # as a kill just before the record would leave it
    assert "is unfinished" in problem(data, "ocm")
    assert "made 0 OCM image(s)" in run_script("make_cutmix.py", *ocm, check=0).stdout
    assert problem(data, "ocm") is None

    (data / "ocm" / "manifest.csv").write_text("file,class\n")
    assert "1 changed (e.g. manifest.csv)" in problem(data, "ocm")
    run_script("make_cutmix.py", *ocm, check=0)
    assert problem(data, "ocm") is None

    br(data, "--bg-color", "black", "--fresh")  # the BR copies it drew patches from are remade
    assert "made from other photos than" in problem(data, "ocm") and str(data / "br") in problem(data, "ocm")
    assert "--overwrite" in problem(data, "ocm")


def test_a_copy_that_did_not_keep_modification_times_is_still_complete_and_a_rewritten_file_is_not(data, tmp_path):
    br(data)
    run_script("make_cutmix.py", "--src", data / "train", "--src", data / "br", "--dst", data / "ocm", "--count", "6",
               "--img-size", "32", check=0)
    copy = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, copy, copy_function=shutil.copy)  # new modification times, as cp -r or unzip give
    made = copy / "br" / "chelsea" / "chelsea_001.png"
    assert made.stat().st_mtime_ns != (data / "br" / "chelsea" / "chelsea_001.png").stat().st_mtime_ns
    assert problem(copy, "br") is None and problem(copy, "ocm") is None  # read, and the same contents
    assert json.loads((copy / "br" / "args.json").read_text())["src"] == str((data / "train").resolve())  # (made there)
    photo_time = (copy / "train" / "chelsea" / "chelsea_001.jpg").stat().st_mtime_ns
    for image in (copy / "br").rglob("*.png"):  # every image now older than its photo (as an archive may give)
        os.utime(image, ns=(photo_time - 10**12, photo_time - 10**12))
    assert "12 already done" in run_script("make_remove_background.py", "--src", copy / "train", "--dst", copy / "br",
                                           *BR_ARGS, check=0).stdout  # the record: made from these, beside them
    content = bytearray(made.read_bytes())
    content[-5] ^= 0xFF  # the same size, other bytes
    made.write_bytes(bytes(content))
    assert "has changed since make_remove_background.py completed it (1 changed (e.g. chelsea/chelsea_001.png))" in \
        problem(copy, "br")
    assert all(len(stamp) == 3 for stamp in records.read(copy / "ocm")["sources"]["br"].values())  # with digests


def test_shares_complete_the_folder_together(data):
    br(data, "--shard", "0/2")
    assert "is unfinished" in problem(data, "br")  # half the photos have images
    r = br(data, "--shard", "1/2")
    assert problem(data, "br") is None and records.read(data / "br")["summary"]["made"] == 12
    assert "share 1/2 done" not in r.stdout


def test_stand_in_folders_need_their_record_and_the_banner_counts_each_part(data, tmp_path):
    write_photo_set(data / "br", per_class=1, size=32, seed=3, classes=CLASSES)
    write_photo_set(data / "ocm", per_class=2, size=32, seed=4, classes=CLASSES)
    r = run_here("model_1e-4.py", "--data", data, "--out", tmp_path / "ck", *TRAIN)
    assert r.returncode == 2 and "is unfinished" in r.stderr
    for step in ("br", "ocm"):
        mark_stand_in_complete(data, step)
    r = run_here("model_1e-4.py", "--data", data, "--out", tmp_path / "ck", *TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "images: train 12, br 3, ocm 6, val 3 at 32 px" in r.stdout


def test_validation_must_cover_every_class_unless_allowed(data):
    (data / "val" / "coffee" / "coffee_000.jpg").unlink()
    (data / "val" / "coffee").rmdir()
    with pytest.raises(UsageError) as e:
        load_training_data(data, 16, Problems(), use_br=False, use_ocm=False)
    assert str(e.value).startswith(f"{data / 'val'} has no photos of 1 class(es): coffee;")
    assert "--allow-missing-val-classes" in str(e.value)
    r = run_here("model_1e-4.py", "--data", data, "--out", data.parent / "ck", *TRAIN, "--no-br", "--no-ocm")
    assert r.returncode == 2 and "has no photos of 1 class(es): coffee" in r.stderr

    loaded = load_training_data(data, 16, Problems(), use_br=False, use_ocm=False, allow_missing_val_classes=True)
    assert loaded["val_missing"] == ["coffee"] and loaded["counts"]["val"] == 2

    (data / "val" / "coffee").mkdir()  # a class whose every validation photo is unreadable is missing too
    (data / "val" / "coffee" / "broken.jpg").write_bytes(b"not a photo")
    with pytest.raises(UsageError, match="has no photos that could be read of 1 class"):
        load_training_data(data, 16, Problems(), use_br=False, use_ocm=False)
    assert find_classes(data / "val") == CLASSES


def test_a_record_of_another_format_or_step_is_not_a_record(data):
    br(data)
    record = json.loads((data / "br" / records.RECORD).read_text())
    (data / "br" / records.RECORD).write_text(json.dumps({**record, "step": "ocm"}))
    assert "is unfinished" in problem(data, "br")
    (data / "br" / records.RECORD).write_text("{ half a file")
    assert "is unfinished" in problem(data, "br")

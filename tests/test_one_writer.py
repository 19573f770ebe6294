"""One writer per output folder: a second run on the same folder is refused at once, naming the first; a
killed run never blocks the next; shares of one split (--shard) write together; a refused run leaves no
folder behind. The lock is tried from separate processes, as two users' commands would meet."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_here, run_script, write_photo_set
from smalldata import lock, records
from smalldata.cli import UsageError

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from smalldata import lock
shard = tuple(map(int, sys.argv[2].split("/"))) if len(sys.argv) > 2 else None
with lock.one_writer(sys.argv[1], "--dst", shard=shard):
    print("holding", flush=True)
    time.sleep(600)
"""


def hold(folder, shard=None):
    """Another process that takes the folder's lock (as a script does) and keeps it until it is killed."""
    args = [sys.executable, "-c", HOLD.format(repo=str(REPO)), str(folder)] + ([f"{shard[0]}/{shard[1]}"] if shard else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "holding", proc.stderr.read()
    return proc


def stop(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def refusal(folder, shard=None):
    with pytest.raises(UsageError) as e:
        with lock.one_writer(folder, "--dst", shard=shard):
            pass
    return str(e.value)


def test_a_second_run_is_refused_at_once_naming_the_first_and_a_killed_one_never_blocks(tmp_path):
    folder = tmp_path / "ocm"
    first = hold(folder)
    try:
        t0 = time.monotonic()
        said = refusal(folder)
        assert time.monotonic() - t0 < 1.0  # at once, not after a wait
        assert said.startswith(f"{folder} is in use by process {first.pid} on {socket.gethostname()} since 20")
        assert "another --dst" in said
    finally:
        stop(first)  # SIGKILL: no clean-up ran, the lock file is still there
    assert (folder / lock.LOCK).exists()
    with lock.one_writer(folder, "--dst"):  # the kernel dropped the dead run's lock with its process
        assert "in use" in run_one_writer_elsewhere(folder)
    assert not (folder / lock.LOCK).exists()  # a run that ends removes its lock file


def run_one_writer_elsewhere(folder):
    code = f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom smalldata import lock\n" \
           f"with lock.one_writer({str(folder)!r}): pass"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr


def test_shares_of_one_split_write_together_and_keep_out_everyone_else(tmp_path):
    folder = tmp_path / "br"
    share0 = hold(folder, (0, 2))
    try:
        with lock.one_writer(folder, "--dst", shard=(1, 2)):  # the other share of the same split
            pass
        said = refusal(folder)  # a whole-folder run while a share writes
        assert f"process {share0.pid}" in said and "(share 0/2)" in said
        assert f"process {share0.pid}" in refusal(folder, (0, 2))  # the same share twice
        assert "another split" in refusal(folder, (1, 3))
    finally:
        stop(share0)
    whole = hold(folder)
    try:
        assert f"process {whole.pid}" in refusal(folder, (0, 2))  # a share while a whole-folder run writes
    finally:
        stop(whole)


def test_a_refused_run_leaves_no_folder_it_made_but_keeps_one_it_wrote_into(tmp_path):
    new = tmp_path / "a" / "b" / "out"
    with pytest.raises(UsageError):
        with lock.one_writer(new):
            (new / "some_class").mkdir()
            (new / "log.txt").write_text("what the run said before it was refused\n")
            raise UsageError("refused")
    assert not (tmp_path / "a").exists()  # every folder on the way that it made
    with pytest.raises(KeyboardInterrupt):
        with lock.one_writer(new):
            (new / "made.png").write_bytes(b"an output")
            raise KeyboardInterrupt
    assert (new / "made.png").is_file()  # a rerun continues from it


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    folder = tmp_path / "br"
    first = hold(folder)
    try:
        monkeypatch.setenv("RANK", "1")  # what torchrun sets in its second worker
        with lock.one_writer(folder, "--dst"):  # rank 1 is part of rank 0's run: it takes nothing
            pass
        monkeypatch.setenv("RANK", "0")
        assert "in use" in refusal(folder)
    finally:
        stop(first)


def ocm_tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in ("log.txt", "complete.json")}


def test_two_ocm_runs_on_one_folder_the_second_exits_2_and_the_first_finishes_intact(tmp_path):
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=3, size=48, seed=1)
    args = ["--src", data / "train", "--count", "400", "--img-size", "64"]
    run_script("make_cutmix.py", *args, "--dst", tmp_path / "reference", check=0)
    dst = data / "ocm"
    cmd = [sys.executable, str(REPO / "make_cutmix.py"), *map(str, args), "--dst", str(dst)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(dst.glob("*/ocm_*.png")) and time.time() < deadline:  # it is writing
            time.sleep(0.005)
        second = run_here("make_cutmix.py", "--src", data / "train", "--dst", dst, "--count", "8", "--img-size", "32",
                          "--overwrite")
        running = first.poll() is None
    finally:
        _, err = first.communicate(timeout=300)
    assert running and first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    said = second.stderr.strip()
    assert said.startswith(f"error: {dst} is in use by process {first.pid} on {socket.gethostname()} since ")
    assert said.endswith("; wait until it ends, or write elsewhere (another --dst)") and "\n" not in said
    # the first run's files are its own, whole and consistent: as an undisturbed run makes them, and complete
    assert ocm_tree(dst) == ocm_tree(tmp_path / "reference")
    classes = sorted(os.listdir(data / "train"))
    originals = [(p, 0) for p in records.class_files(data / "train", classes)]
    assert records.check(data, "ocm", classes, originals) is None
    assert (dst / "log.txt").read_text().count("===== ") == 1  # the refused run wrote nothing into its log


@pytest.mark.parametrize("script", ["make_remove_background.py", "check_score.py"])
def test_br_and_check_score_take_the_lock_of_their_output_folder(script, tmp_path):
    photos = write_photo_set(tmp_path / "data" / "train", per_class=1, size=32, classes=["chelsea", "coffee"])
    if script == "check_score.py":
        from test_reliability import small_checkpoint

        args = ["--checkpoint", small_checkpoint(tmp_path / "m.pth", ["chelsea", "coffee"]), "--data", photos,
                "--out", tmp_path / "score", "--device", "cpu"]
        folder = tmp_path / "score" / "train"  # (the scored folder's own sub-folder)
    else:
        args = ["--src", photos, "--dst", tmp_path / "br", "--model", "u2netp"]
        folder = tmp_path / "br"
    holder = hold(folder)
    try:
        r = run_here(script, *args)
    finally:
        stop(holder)
    assert r.returncode == 2 and f"is in use by process {holder.pid}" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == [lock.LOCK]  # nothing of the refused run's


def test_the_lock_file_names_its_holder(tmp_path):
    folder = tmp_path / "x"
    with lock.one_writer(folder):
        pid, host, since = (folder / lock.LOCK).read_text().split(" ", 2)
        assert (int(pid), host) == (os.getpid(), socket.gethostname()) and since.startswith("20")


def test_two_stage_1_runs_on_one_out_the_second_exits_2_and_the_first_finishes_consistent(tmp_path):
    """The issue's command: two stage-1 runs on one --out with other --epochs. The second is refused at
    once, naming the first; the first's files say one run (its args, its last epoch, its log)."""
    import json

    import torch

    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=4, size=40, classes=["chelsea", "coffee"])
    write_photo_set(data / "val", per_class=2, size=40, seed=1, classes=["chelsea", "coffee"])
    common = ["--data", data, "--out", tmp_path / "ck", "--arch", "resnet18", "--img-size", "32", "--batch-size", "4",
              "--weights", "none", "--device", "cpu", "--no-br", "--no-ocm", "--rule", "last"]
    first = subprocess.Popen([sys.executable, str(REPO / "model_1e-4.py"), *map(str, common), "--epochs", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = tmp_path / "ck" / "stage1" / lock.LOCK
    deadline = time.monotonic() + 120
    while not lock_file.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = run_script("model_1e-4.py", *common, "--epochs", "2")
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, second.stderr
    assert f"{tmp_path / 'ck' / 'stage1'} is in use by process {first.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    stage = tmp_path / "ck" / "stage1"
    assert json.loads((stage / "args.json").read_text())["epochs"] == 3
    assert torch.load(stage / "last.pth", weights_only=True)["epoch"] == 3
    assert torch.load(tmp_path / "ck" / "divergence.pth", weights_only=True)["epoch"] == 3
    log = (stage / "log.txt").read_text()
    assert "epochs 1..2" not in log and "in use" not in log  # the refused run wrote nothing there

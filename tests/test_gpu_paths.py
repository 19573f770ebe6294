"""The CUDA and multi-process paths, as far as a CPU can show them: per-worker dropout with a shared
augmentation draw, kept across a resume; the GPU random state of a run resumed on fewer GPUs; float32
logits under bf16 autocast; workers that wait for the slowest to load, agree on where they resume, and
add nothing (not NaN) to precise BN when their share is empty; the per-GPU batch; temporaries on a file
system shared between machines."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from test_ddp import torchrun
from test_runtime import tiny_data, tiny_loop
from smalldata import files
from smalldata.model import build_model
from smalldata.train import evaluate, restore_cuda_rng


def test_each_worker_draws_its_own_dropout_from_the_same_model(tmp_path):
    r = torchrun(REPO / "tests" / "ddp_worker.py", tmp_path / "d.json", "dropout", workers=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads((tmp_path / "d.json").read_text())
    assert a["weights"] == b["weights"]  # built alike (the same seed before the model)
    assert a["mask"] != b["mask"]  # dropout: each worker its own random numbers


def test_a_run_made_on_two_gpus_resumes_on_one(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state, device)))
    two = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]  # as older last.pth kept them
    restore_cuda_rng(two, torch.device("cuda", 0))
    assert len(calls) == 1 and torch.equal(calls[0][0], two[0])
    restore_cuda_rng(two[1], torch.device("cuda", 0))  # the state of this worker's GPU only, as written now
    assert torch.equal(calls[1][0], two[1])
    restore_cuda_rng(two, torch.device("cpu"))  # a GPU run resumed on a CPU: nothing to restore
    assert len(calls) == 2


def test_logits_and_evaluation_stay_float32_under_bf16_autocast():
    model = build_model("resnet18", 10).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
    assert logits.dtype == torch.float32 and features.dtype == torch.bfloat16
    exact = F.linear(features.float(), model.fc.weight, model.fc.bias)  # the head in float32 on bf16 features
    torch.testing.assert_close(logits, exact, rtol=0, atol=0)

    loop = tiny_loop()
    loop.amp = torch.bfloat16  # what a GPU run uses; on the CPU autocast runs in bf16 too
    xs, ys = tiny_data(n=12)
    loss, se, acc = evaluate(loop, xs, ys)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = loop.model(loop.norm(xs))
    assert out.dtype == torch.float32
    assert abs(loss - F.cross_entropy(out, ys).item()) < 1e-6


def test_temporaries_of_another_machine_are_left_alone_and_this_ones_stale_are_removed(tmp_path):
    dead = 2**22 + 12345  # beyond pid_max on most systems: no such process
    mine_stale = tmp_path / f".a.png{files.TEMP_MARK}{files.HOST}-{dead}-abcd1234"
    mine_live = tmp_path / f".b.png{files.TEMP_MARK}{files.HOST}-{os.getpid()}-abcd1234"
    other = tmp_path / f".c.png{files.TEMP_MARK}othernode-{dead}-abcd1234"
    other_old = tmp_path / f".d.png{files.TEMP_MARK}othernode-{dead}-abcd1235"
    for p in (mine_stale, mine_live, other, other_old):
        p.write_bytes(b"x")
    week = time.time() - files.FOREIGN_STALE_S - 60
    os.utime(other_old, (week, week))
    assert files.remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine_live.name, other.name])
    with files.atomic_path(tmp_path / "e.png") as tmp:
        assert f"{files.TEMP_MARK}{files.HOST}-{os.getpid()}-" in tmp.name
        tmp.write_bytes(b"y")


def test_only_one_background_removal_worker_clears_stale_temporaries(tmp_path):
    from conftest import write_photo_set
    from test_ddp import torchrun as run

    photos = write_photo_set(tmp_path / "train", per_class=1, size=80, classes=["chelsea", "coffee"])
    (tmp_path / "br" / "chelsea").mkdir(parents=True)
    stale = tmp_path / "br" / "chelsea" / f".x.png{files.TEMP_MARK}{files.HOST}-{2**22 + 7}-abcd1234"
    stale.write_bytes(b"x")
    r = run(REPO / "make_remove_background.py", "--src", photos, "--dst", tmp_path / "br", "--model", "u2netp",
            "--min-confidence", "0", "--fallback", "copy")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("removed 1 temporary file(s)") == 1 and not stale.exists()
    assert len(list((tmp_path / "br").rglob("*.png"))) == 2


def test_the_drawing_helper_ends_when_the_process_that_started_it_is_killed(tmp_path):
    # A killed training run (a kill -9, a lost node) must not leave its curves helper, with matplotlib's
    # memory, running on: the helper watches its parent and ends within about a second of it.
    import signal
    import subprocess

    code = ("import os, sys, time; from smalldata import plots; "
            "plots.elsewhere(plots.training_curves, [{'epoch': 1, 'train_loss': 1.0, 'val_loss': 1.0, 'train_acc': 50.0, "
            "'val_acc': 40.0, 'gap': 10.0}], sys.argv[1], 't'); "
            "print(plots._POOL[0]._processes and list(plots._POOL[0]._processes)[0], flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c.png")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    helper = int(proc.stdout.readline())
    assert (tmp_path / "c.png").stat().st_size > 1000
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    def alive(pid):  # (an ended helper nobody has reaped yet is a zombie: ended)
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    for _ in range(100):
        if not alive(helper):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the helper {helper} outlived its killed parent by 10 s")


def test_every_worker_waits_for_the_slowest_to_load_before_the_first_collective(tmp_path):
    worker = REPO / "tests" / "ddp_worker.py"
    waited = torchrun(worker, tmp_path / "wait.txt", "arrive", "wait", workers=3)
    assert waited.returncode == 0 and (tmp_path / "wait.txt").read_text() == "ok 3", waited.stderr[-2000:]
    rushed = torchrun(worker, tmp_path / "rush.txt", "arrive", "no-wait", workers=3)  # the defect, for contrast
    assert rushed.returncode != 0 and not (tmp_path / "rush.txt").exists()


def test_workers_that_would_resume_after_different_epochs_are_refused_alike(tmp_path):
    r = torchrun(REPO / "tests" / "ddp_worker.py", tmp_path / "said", "agree", workers=2)
    assert r.returncode == 0, r.stderr[-2000:]
    said = [(tmp_path / f"said.{rank}").read_text() for rank in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("UsageError: the torchrun workers disagree: the epoch each "
                                                     "resumes after ranges from 0 to 1")


def test_after_a_resume_each_worker_draws_its_own_dropout_as_if_never_stopped(tmp_path):
    r = torchrun(REPO / "tests" / "ddp_worker.py", tmp_path / "rng.json", "rng", workers=2)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = json.loads((tmp_path / "rng.json").read_text())
    assert a["resumed"] == a["uninterrupted"] and b["resumed"] == b["uninterrupted"]
    assert a["resumed"] != b["resumed"]  # (rank 0's state restored everywhere made them equal)


def test_precise_bn_with_a_worker_whose_share_is_empty_gives_the_one_process_statistics(tmp_path):
    worker = REPO / "tests" / "ddp_worker.py"
    one = subprocess.run([sys.executable, worker, tmp_path / "one.json", "bn", "8", "1"], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(worker, tmp_path / "two.json", "bn", "8", "1", workers=2)  # one image: worker 1 gets none
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for k in a:
        assert all(math.isfinite(v) for v in b[k]), k
        assert max(abs(x - y) for x, y in zip(a[k], b[k])) < 1e-5, k


def test_a_small_per_gpu_batch_is_refused_unless_batchnorm_is_synchronised(monkeypatch):
    from types import SimpleNamespace

    from smalldata.cli import UsageError
    from smalldata.stage import check_workers

    monkeypatch.setenv("WORLD_SIZE", "16")
    spec = SimpleNamespace(optim=SimpleNamespace(batch_size=32), hardware=SimpleNamespace(sync_bn=False))
    with pytest.raises(UsageError, match="each gets 2 images a step.*--batch-size 256 or more.*--sync-bn"):
        check_workers(spec, torch.device("cuda"))
    check_workers(SimpleNamespace(optim=SimpleNamespace(batch_size=256), hardware=spec.hardware), torch.device("cuda"))
    check_workers(SimpleNamespace(optim=spec.optim, hardware=SimpleNamespace(sync_bn=True)), torch.device("cuda"))
    check_workers(spec, torch.device("cpu"))  # (a CPU has no SyncBatchNorm; CPU runs are for tests)

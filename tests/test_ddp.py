"""torchrun: two CPU workers (gloo) train as one process would, and only rank 0 prints and writes."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import torchvision

from conftest import REPO, run_script, write_photo_set
from smalldata import records


def torchrun(*args, workers=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}", *map(str, args)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def test_two_workers_take_shares_of_each_global_batch_and_agree_with_one_process(tmp_path):
    worker = REPO / "tests" / "ddp_worker.py"
    one = subprocess.run([sys.executable, worker, tmp_path / "one.json"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(worker, tmp_path / "two.json")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["world"], b["world"]) == (1, 2)
    for ra, rb in zip(a["rows"], b["rows"]):  # loss, accuracy of training and of a measurement
        np.testing.assert_allclose(ra["train"], rb["train"], rtol=1e-5)
        np.testing.assert_allclose(ra["eval"], rb["eval"], rtol=1e-5)
    for k in a["weights"]:  # gradients averaged over the workers = the gradient of the global batch
        np.testing.assert_allclose(a["weights"][k], b["weights"][k], rtol=1e-4, atol=1e-6)


def test_torchrun_stage1_prints_and_writes_once_and_its_checkpoint_loads_in_torchvision(tiny_data, tmp_path):
    out = tmp_path / "ck"
    args = ("--data", tiny_data, "--out", out, "--no-br", "--no-ocm", "--arch", "resnet18", "--img-size", "32",
            "--batch-size", "8", "--weights", "none", "--device", "cpu")
    r = torchrun(REPO / "model_1e-4.py", *args, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("== stage 1") == 1 and "2 workers (torchrun, DistributedDataParallel over gloo)" in r.stdout
    assert r.stdout.count("epoch   2  train") == 1
    rows = (out / "stage1/metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs: one writer
    ckpt = torch.load(out / "divergence.pth", weights_only=True)
    torchvision.models.resnet18(num_classes=4).load_state_dict(ckpt["model"])  # no "module." prefixes

    more = run_script("model_1e-4.py", *args, "--epochs", "3", check=0)  # one process continues the torchrun run
    assert "resuming after epoch 2" in more.stdout
    assert len((out / "stage1/metrics.csv").read_text().splitlines()) == 4

    odd = torchrun(REPO / "model_1e-4.py", "--data", tiny_data, "--out", tmp_path / "odd", "--epochs", "1",
                   "--batch-size", "7", "--device", "cpu", "--weights", "none")
    assert odd.returncode != 0 and "--batch-size 7 is the global batch" in odd.stderr


def test_background_removal_in_shards_writes_what_one_process_writes(tmp_path):
    photos = write_photo_set(tmp_path / "train", per_class=3, size=80)
    common = ("--src", photos, "--model", "u2netp", "--min-confidence", "0", "--bg-color", "auto")
    run_script("make_remove_background.py", *common, "--dst", tmp_path / "one", check=0)
    for i in (0, 1):
        run_script("make_remove_background.py", *common, "--dst", tmp_path / "shards", "--shard", f"{i}/2", check=0)
        assert (records.read(tmp_path / "shards") is None) == (i == 0)  # complete once both shares have run
    r = torchrun(REPO / "make_remove_background.py", *common, "--dst", tmp_path / "workers")
    assert r.returncode == 0, r.stderr[-3000:]  # (rank 1 takes no lock: rank 0 holds the folder for both)
    assert "[rank 1] " in r.stdout and "shard 1/2" in r.stdout  # each worker reports its own files
    made = [records.read(tmp_path / name)["made"] for name in ("one", "shards", "workers")]
    assert sorted(made[0]) == sorted(made[1]) == sorted(made[2]) and len(made[0]) == 12

    def images(folder):
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.png")}

    one = images(tmp_path / "one")
    assert len(one) == 12 and images(tmp_path / "shards") == one and images(tmp_path / "workers") == one
    colors = sorted((tmp_path / "workers").glob("bg_colors*.csv"))
    assert [p.name for p in colors] == ["bg_colors.shard-0-of-2.csv", "bg_colors.shard-1-of-2.csv"]
    rows = [line for p in colors for line in p.read_text().splitlines()[1:]]
    assert sorted(rows) == sorted((tmp_path / "one" / "bg_colors.csv").read_text().splitlines()[1:])

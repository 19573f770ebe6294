"""The two training stages: model, divergence rule, files of the contract, resume, refusals."""
import csv
import json
import shutil

import pytest
import torch
import torchvision

from conftest import run_script, write_photo_set
from smalldata import checkpoint
from smalldata.model import build_model, count_parameters
from smalldata.train import best_epoch, find_divergence

SMALL = ["--img-size", "32", "--batch-size", "8", "--weights", "none", "--device", "cpu"]


def test_vgg13_bn_has_the_originals_parameter_count_at_100_classes():
    assert count_parameters(build_model("vgg13_bn", 100)) == 129_366_436


def test_head_is_replaced_for_other_families():
    model = build_model("resnet18", 7)
    assert model.fc.out_features == 7
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=7).state_dict())


def rows_from(train, val):
    return [{"epoch": i + 1, "train_acc": t, "val_acc": v, "gap": t - v} for i, (t, v) in enumerate(zip(train, val))]


def test_divergence_rule_fires_where_the_gap_starts_to_widen():
    train = [30, 50, 65, 75, 85, 95, 99, 100, 100]
    val = [28, 46, 60, 68, 67, 66, 67, 65, 64]  # val peaks at epoch 4, then the gap opens
    found = find_divergence(rows_from(train, val), window=3, jump=5)
    assert found["fired_at_epoch"] == 7 and found["chosen_epoch"] == 4
    assert found["gap_growth"] == pytest.approx((99 - 67) - (75 - 68))


def test_divergence_rule_does_not_fire_on_parallel_curves():
    train = [20 + 8 * i for i in range(10)]
    val = [t - 4 for t in train]  # both improve together; constant gap
    assert find_divergence(rows_from(train, val), window=3, jump=5) is None


def test_divergence_rule_needs_val_to_stall():
    train = [30, 50, 70, 90, 100]
    val = [28, 40, 50, 60, 70]  # gap grows, but val keeps improving: still learning
    assert find_divergence(rows_from(train, val), window=2, jump=5) is None


def test_best_epoch_prefers_val_then_smaller_gap():
    rows = rows_from([50, 80, 90, 95], [40, 60, 60, 55])
    assert best_epoch(rows) == 2  # epochs 2 and 3 tie on val; 2 has the smaller gap


@pytest.fixture
def data_with_extras(tiny_data):
    """tiny_data plus stand-in br/ and ocm/ folders of other real photos of the same classes."""
    write_photo_set(tiny_data / "br", per_class=2, seed=3)
    write_photo_set(tiny_data / "ocm", per_class=2, seed=4)
    return tiny_data


def read_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_stages_write_every_file_of_the_contract(data_with_extras, tmp_path):
    out = tmp_path / "ck"
    r1 = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL, check=0)
    assert "images: train 16, br 8, ocm 8, val 8 at 32 px" in r1.stdout
    for name in ("1e-4/metrics.csv", "1e-4/curves.png", "1e-4/last.pth", "1e-4/divergence.json", "divergence.pth"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "1e-4/metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:8] == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "gap", "seconds"]
    info = json.loads((out / "1e-4/divergence.json").read_text())
    assert info["fired"] is None and info["chosen_epoch"] == best_epoch(
        [{k: float(v) for k, v in r.items()} for r in rows])

    r2 = run_script("model_1e-7_ep20.py", "--data", data_with_extras, "--out", out, "--epochs", "2",
                    "--batch-size", "8", "--device", "cpu", check=0)
    assert "start (ep 0)" in r2.stdout
    for name in ("1e-7/metrics.csv", "1e-7/curves.png", "1e-7/last.pth", "final.pth"):
        assert (out / name).is_file(), name
    assert [r["epoch"] for r in read_metrics(out / "1e-7/metrics.csv")] == ["0", "1", "2"]

    for name in ("divergence.pth", "final.pth", "1e-4/last.pth", "1e-7/last.pth"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["classes"] == ["astronaut", "chelsea", "coffee", "rocket"]
        assert ckpt["arch"] == "vgg13_bn" and ckpt["img_size"] == 32 and len(ckpt["mean"]) == 3
        assert json.dumps(ckpt["args"])  # JSON types only
        plain = torchvision.models.vgg13_bn(num_classes=4)
        plain.load_state_dict(ckpt["model"])  # no prefixes, no renaming
    assert "optimizer" in torch.load(out / "1e-4/last.pth", weights_only=True)

    again = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL, check=0)
    assert "already finished" in again.stdout
    other = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL,
                       "--lr", "1e-3", check=2)
    assert "other arguments" in other.stderr and "--fresh" in other.stderr


def test_resume_gives_the_same_metrics_and_weights(tiny_data, tmp_path):
    args = ["--data", tiny_data, "--no-br", "--no-ocm", "--deterministic", *SMALL]
    run_script("model_1e-4.py", *args, "--out", tmp_path / "a", "--epochs", "3", check=0)
    run_script("model_1e-4.py", *args, "--out", tmp_path / "b", "--epochs", "1", check=0)  # interrupted after 1
    r = run_script("model_1e-4.py", "--resume", tmp_path / "b/1e-4/last.pth", *args, "--out", tmp_path / "b",
                   "--epochs", "3", check=0)
    assert "resuming after epoch 1" in r.stdout

    def strip(rows):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in rows]

    a, b = (read_metrics(tmp_path / x / "1e-4/metrics.csv") for x in "ab")
    assert len(a) == 3 and strip(a) == strip(b)
    wa, wb = (torch.load(tmp_path / x / "1e-4/last.pth", weights_only=True)["model"] for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_class_mismatch_is_refused_with_the_classes_listed(data_with_extras, tmp_path):
    shutil.copytree(data_with_extras / "br/rocket", data_with_extras / "br/zebra")
    r = run_script("model_1e-4.py", "--data", data_with_extras, "--out", tmp_path / "ck", "--epochs", "1", *SMALL)
    assert r.returncode == 2
    assert "br" in r.stderr and "zebra" in r.stderr and "--no-br" in r.stderr


def test_no_br_and_no_ocm_leave_sources_out(data_with_extras, tmp_path):
    r = run_script("model_1e-4.py", "--data", data_with_extras, "--out", tmp_path / "ck", "--epochs", "1",
                   "--no-br", "--no-ocm", *SMALL, check=0)
    assert "images: train 16, val 8 at 32 px" in r.stdout


def test_missing_imagenet_weights_stop_with_advice(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache, and no network here
    small = [a for a in SMALL if a not in ("--weights", "none")]
    r = run_script("model_1e-4.py", "--data", tiny_data, "--out", tmp_path / "ck", "--epochs", "1", *small,
                   "--weights", "imagenet")
    if r.returncode == 0:
        pytest.skip("this machine could download the ImageNet weights")
    assert r.returncode == 2
    assert "--weights none" in r.stderr and str(tmp_path / "torch-home") in r.stderr


def test_stage2_refuses_a_checkpoint_of_other_classes(tiny_data, tmp_path):
    model = build_model("vgg13_bn", 3)
    ckpt = checkpoint.make(checkpoint.model_state(model), arch="vgg13_bn", classes=["a", "b", "c"], img_size=32,
                           mean=[0.5] * 3, std=[0.5] * 3, epoch=1, metrics={}, args={})
    checkpoint.save(ckpt, tmp_path / "other.pth")
    r = run_script("model_1e-7_ep20.py", "--data", tiny_data, "--out", tmp_path / "ck", "--init",
                   tmp_path / "other.pth", "--epochs", "1", "--device", "cpu")
    assert r.returncode == 2 and "classes" in r.stderr and "astronaut" in r.stderr

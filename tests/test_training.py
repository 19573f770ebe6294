"""The two training stages: model, divergence rule, files of the contract, resume, refusals."""
import csv
import json

import pytest
import torch
import torchvision

from conftest import mark_stand_in_complete, run_script, write_photo_set
from smalldata import checkpoint
from smalldata.model import build_model, count_parameters
from smalldata.rule import steady_best

SMALL = ["--img-size", "32", "--batch-size", "8", "--weights", "none", "--device", "cpu"]


def test_vgg13_bn_has_the_originals_parameter_count_at_100_classes():
    assert count_parameters(build_model("vgg13_bn", 100)) == 129_366_436


def test_head_is_replaced_for_other_families():
    model = build_model("resnet18", 7)
    assert model.fc.out_features == 7
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=7).state_dict())


@pytest.fixture
def data_with_extras(tiny_data):
    """tiny_data plus stand-in br/ and ocm/ folders of other real photos of the same classes, marked complete
    as BR and OCM mark their outputs."""
    write_photo_set(tiny_data / "br", per_class=2, seed=3)
    write_photo_set(tiny_data / "ocm", per_class=2, seed=4)
    for step in ("br", "ocm"):
        mark_stand_in_complete(tiny_data, step)
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
    # the default rule keeps the SWA mean (here of epoch 2 alone); the divergence rule is replayed beside it
    assert info["rule"]["rule"] == "swa" and info["chosen_epoch"] == 2
    assert torch.load(out / "divergence.pth", weights_only=True)["weights"].startswith("SWA")
    would = info["divergence_rule_would"]
    assert would["fired"] is False and would["chosen_epoch"] == steady_best(
        [{k: float(v) for k, v in r.items() if v != ""} for r in rows])

    r2 = run_script("model_1e-7_ep20.py", "--data", data_with_extras, "--out", out, "--epochs", "2",
                    "--batch-size", "8", "--device", "cpu", check=0)
    assert "start (ep 0)" in r2.stdout
    assert "decoded images: " + ", ".join(f"{k} decoded and cached" for k in ("train", "br", "ocm", "val")) in r1.stdout
    assert "decoded images: " + ", ".join(f"{k} from cache" for k in ("train", "br", "ocm", "val")) in r2.stdout
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
    finished_last = torch.load(out / "1e-4/last.pth", weights_only=True)
    assert finished_last["finished"] and finished_last["optimizer"] is None  # 1 GB of Adam state left out

    again = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL, check=0)
    assert "already finished" in again.stdout
    other = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL,
                       "--lr", "1e-3", check=2)
    assert "other arguments" in other.stderr and "--fresh" in other.stderr


def test_a_finished_run_extended_with_more_epochs_continues_its_history(tiny_data, tmp_path):
    # (a kill and rerun repeating an uninterrupted run exactly is tests/test_reliability.py's)
    # (--rule divergence: under swa the averaging window is the last quarter of --epochs, which extending moves)
    args = ["--data", tiny_data, "--no-br", "--no-ocm", "--deterministic", "--arch", "resnet18", "--rule", "divergence",
            *SMALL]
    run_script("model_1e-4.py", *args, "--out", tmp_path / "a", "--epochs", "3", check=0)
    run_script("model_1e-4.py", *args, "--out", tmp_path / "b", "--epochs", "1", check=0)
    r = run_script("model_1e-4.py", *args, "--out", tmp_path / "b", "--epochs", "3", check=0)
    assert "resuming after epoch 1" in r.stdout and "Adam starts afresh" in r.stdout

    def strip(rows):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in rows]

    a, b = (strip(read_metrics(tmp_path / x / "1e-4/metrics.csv")) for x in "ab")
    assert [row["epoch"] for row in b] == ["1", "2", "3"] and a[0] == b[0]
    assert checkpoint.load(tmp_path / "b/1e-4/last.pth")["epoch"] == 3


def test_no_br_and_no_ocm_leave_sources_out(data_with_extras, tmp_path):
    r = run_script("model_1e-4.py", "--data", data_with_extras, "--out", tmp_path / "ck", "--epochs", "1",
                   "--no-br", "--no-ocm", "--arch", "resnet18", *SMALL, check=0)
    assert "images: train 16, val 8 at 32 px" in r.stdout


def test_missing_imagenet_weights_stop_with_advice(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache, and no network here
    small = [a for a in SMALL if a not in ("--weights", "none")]
    r = run_script("model_1e-4.py", "--data", tiny_data, "--out", tmp_path / "ck", "--epochs", "1", *small,
                   "--weights", "imagenet", "--no-br", "--no-ocm")
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


def test_measurements_use_batchnorm_statistics_recomputed_for_the_weights():
    """Precise BN: whatever running averages a model carries, measuring it first recomputes them on the
    training originals, so two models with the same weights measure (and are saved) alike."""
    from test_runtime import tiny_data, tiny_loop

    from smalldata.train import measure, train_epoch

    a = tiny_loop()
    x, y = tiny_data(n=12)
    train_epoch(a, x, y)
    b = tiny_loop()
    b.model.load_state_dict(a.model.state_dict())
    with torch.no_grad():  # running averages far from the truth, as after a few fast steps
        b.model[1].running_mean.fill_(5.0)
        b.model[1].running_var.fill_(0.01)
    data = {"orig": (x, y), "val": (x[:6], y[:6]), "train": (x, y)}
    ra, rb = measure(a, data, 1, 0.0, (0, 0, 0)), measure(b, data, 1, 0.0, (0, 0, 0))
    assert torch.allclose(a.model[1].running_mean, b.model[1].running_mean, atol=1e-5)
    assert torch.allclose(a.model[1].running_var, b.model[1].running_var, atol=1e-5)
    assert (ra["train_acc"], ra["val_acc"], ra["val_loss"]) == (rb["train_acc"], rb["val_acc"], rb["val_loss"])


def test_resume_keeps_the_epoch_files_last_pth_needs_and_drops_those_written_past_it(tmp_path):
    """A killed run can leave epoch files newer than its last.pth (written just before the kill), and
    the files its last.pth lists must survive until a newer last.pth is in place."""
    from test_runtime import tiny_loop

    from smalldata.keeper import Keeper
    from smalldata.train import training_state

    loop = tiny_loop()
    meta = dict(arch="tiny", classes=["a", "b", "c"], img_size=8, mean=[0.5] * 3, std=[0.25] * 3, args={})
    keeper = Keeper(tmp_path, meta)
    history = []
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "val_acc": 50.0})
        keeper.snapshot(loop.model, history[-1], needed={2, 3})
    keeper.save_last(3, lambda optimizer: training_state(loop, history, {}, optimizer), finished=False)
    keeper.writer.flush()
    files = sorted(p.name for p in (tmp_path / "epochs").iterdir())
    assert files == ["epoch_002.pth"]  # epoch 3's weights are in last.pth itself; epoch 1 was never needed
    for epoch in (6, 7):  # what a killed later save may leave behind
        keeper.kept[epoch] = keeper.kept[3]
        checkpoint.save(keeper.make(epoch), keeper.epoch_path(epoch))
    keeper.close()

    resumed = Keeper(tmp_path, meta)
    resumed.restore(checkpoint.load(tmp_path / "last.pth"))
    assert sorted(resumed.kept) == [2, 3]
    assert sorted(p.name for p in (tmp_path / "epochs").iterdir()) == ["epoch_002.pth"]
    resumed.close()


def test_streaming_from_the_cache_trains_exactly_as_the_set_in_memory(data_with_extras, tmp_path):
    args = ["--data", data_with_extras, "--epochs", "2", "--deterministic", "--arch", "resnet18", *SMALL]
    ram = run_script("model_1e-4.py", *args, "--out", tmp_path / "a", "--data-on", "device", check=0)
    streamed = run_script("model_1e-4.py", *args, "--out", tmp_path / "b", "--data-on", "stream", check=0)
    assert "in RAM (--data-on device)" in ram.stdout
    assert "streamed, memory-mapped from the decode cache (--data-on stream)" in streamed.stdout

    def rows(folder):  # (timing aside)
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")}
                for r in read_metrics(folder / "1e-4/metrics.csv")]

    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) == 2
    wa, wb = (checkpoint.load(tmp_path / x / "1e-4/last.pth")["model"] for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

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
    for name in ("stage1/metrics.csv", "stage1/curves.png", "stage1/last.pth", "stage1/divergence.json", "divergence.pth"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "stage1/metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:8] == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "gap", "seconds"]
    info = json.loads((out / "stage1/divergence.json").read_text())
    # the default rule is the recipe's; two epochs are too few for it to decide: it keeps the steady best
    assert info["rule"]["rule"] == "divergence" and info["chosen_epoch"] == steady_best(
        [{k: float(v) for k, v in r.items() if v != "" and not k.endswith("_correct")} for r in rows])
    assert torch.load(out / "divergence.pth", weights_only=True)["epoch"] == info["chosen_epoch"]
    files = {o["file"]: o for o in info["outputs"]}  # every candidate beside it, saved and scored
    assert set(files) == {"divergence.pth", "best.pth", "swa.pth", "ema.pth"} and all(
        0 <= o["val_ci95"][0] <= o["val_acc"] <= o["val_ci95"][1] <= 100 for o in files.values())
    assert torch.load(out / "swa.pth", weights_only=True)["weights"].startswith("SWA: the mean of the weights at the "
                                                                                "end of epochs 1-2")
    assert torch.load(out / "ema.pth", weights_only=True)["weights"].startswith("EMA")
    assert "the next stage starts from divergence.pth" in r1.stdout
    with open(out / "stage1/val_losses.csv") as f:  # each val photo's loss every epoch, for paired comparisons
        per_photo = list(csv.reader(f))
    assert per_photo[0][:2] == ["epoch", "correct"] and len(per_photo[0]) == 2 + 8
    assert all("/" in name for name in per_photo[0][2:])  # <class>/<file>, as ImageFolder lists them
    for photos, metrics in zip(per_photo[1:], rows):
        losses = [float(v) for v in photos[2:]]
        assert abs(sum(losses) / 8 - float(metrics["val_loss"])) < 1e-4
        assert 100 * photos[1].count("1") / 8 == float(metrics["val_acc"])

    r2 = run_script("model_1e-7_ep20.py", "--data", data_with_extras, "--out", out, "--epochs", "2",
                    "--batch-size", "8", "--device", "cpu", check=0)
    assert "start (ep 0)" in r2.stdout
    assert "decoded images: " + ", ".join(f"{k} decoded and cached" for k in ("train", "br", "ocm", "val")) in r1.stdout
    assert "decoded images: " + ", ".join(f"{k} from cache" for k in ("train", "br", "ocm", "val")) in r2.stdout
    for name in ("stage2/metrics.csv", "stage2/curves.png", "stage2/last.pth", "final.pth"):
        assert (out / name).is_file(), name
    assert [r["epoch"] for r in read_metrics(out / "stage2/metrics.csv")] == ["0", "1", "2"]

    for name in ("divergence.pth", "final.pth", "stage1/last.pth", "stage2/last.pth"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["classes"] == ["astronaut", "chelsea", "coffee", "rocket"]
        assert ckpt["arch"] == "vgg13_bn" and ckpt["img_size"] == 32 and len(ckpt["mean"]) == 3
        assert json.dumps(ckpt["args"])  # JSON types only
        plain = torchvision.models.vgg13_bn(num_classes=4)
        plain.load_state_dict(ckpt["model"])  # no prefixes, no renaming
    finished_last = torch.load(out / "stage1/last.pth", weights_only=True)
    assert finished_last["finished"] and finished_last["optimizer"] is None  # 1 GB of Adam state left out

    again = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL, check=0)
    assert "already finished" in again.stdout
    other = run_script("model_1e-4.py", "--data", data_with_extras, "--out", out, "--epochs", "2", *SMALL,
                       "--lr", "1e-3", check=2)
    assert "other arguments" in other.stderr and "--fresh" in other.stderr


def test_a_finished_run_extended_with_more_epochs_continues_its_history(tiny_data, tmp_path):
    # (a kill and rerun repeating an uninterrupted run exactly is tests/test_reliability.py's)
    args = ["--data", tiny_data, "--no-br", "--no-ocm", "--deterministic", "--arch", "resnet18", "--rule", "divergence",
            *SMALL]
    run_script("model_1e-4.py", *args, "--out", tmp_path / "a", "--epochs", "3", check=0)
    run_script("model_1e-4.py", *args, "--out", tmp_path / "b", "--epochs", "1", check=0)
    r = run_script("model_1e-4.py", *args, "--out", tmp_path / "b", "--epochs", "3", check=0)
    assert "resuming after epoch 1" in r.stdout and "Adam starts afresh" in r.stdout

    def strip(rows):
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s") and not k.startswith(("swa_", "ema_"))}
                for row in rows]  # (weight averages are scored at a stage's end: epoch 1 was b's end, not a's)

    a, b = (strip(read_metrics(tmp_path / x / "stage1/metrics.csv")) for x in "ab")
    assert [row["epoch"] for row in b] == ["1", "2", "3"] and a[0] == b[0]
    assert checkpoint.load(tmp_path / "b/stage1/last.pth")["epoch"] == 3


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
    from smalldata.layout import RunPaths
    from smalldata.train import training_state

    loop = tiny_loop()
    meta = dict(arch="tiny", classes=["a", "b", "c"], img_size=8, mean=[0.5] * 3, std=[0.25] * 3, args={})
    keeper = Keeper(RunPaths(tmp_path, "stage1", tmp_path), meta)
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
        checkpoint.save(keeper.make(epoch), keeper.paths.epoch(epoch))
    keeper.close()

    resumed = Keeper(RunPaths(tmp_path, "stage1", tmp_path), meta)
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
                for r in read_metrics(folder / "stage1/metrics.csv")]

    assert rows(tmp_path / "a") == rows(tmp_path / "b") and len(rows(tmp_path / "a")) == 2
    wa, wb = (checkpoint.load(tmp_path / x / "stage1/last.pth")["model"] for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_that_goes_non_finite_stops_with_exit_3_and_keeps_no_nan_weights(tiny_data, tmp_path):
    out = tmp_path / "ck"
    r = run_script("model_1e-4.py", "--data", tiny_data, "--out", out, "--epochs", "3", "--no-br", "--no-ocm",
                   "--arch", "resnet18", *SMALL, "--lr", "1e30", check=3)  # finite, but the weights blow up
    assert "epoch 1: the training loss became NaN or inf at step" in r.stderr and "Try a lower --lr" in r.stderr
    assert not list(out.glob("*.pth")) and not list((out / "stage1").rglob("*.pth"))  # nothing under a kept name

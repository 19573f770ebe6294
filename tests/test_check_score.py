"""check_score.py on a hand-built checkpoint whose every prediction is known in advance.

The model is a real torchvision resnet18 (img_size 32) with weights set by hand so that it
is a nearest-grey-level classifier: class k stands for the grey level LEVELS[k], and an image
of a solid grey v gets logits -(v - LEVELS[k])^2 (up to a constant), i.e. classes ranked by
distance. So a solid image of level LEVELS[j] is predicted as class j, and its top-5 are the
five nearest levels, whatever folder it sits in.
"""
import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import run_script
from smalldata import checkpoint
from smalldata.model import build_model
from smalldata.score import class_probs

LEVELS = [0, 25, 60, 100, 150, 185, 225, 255]  # no two are equally far from any other
CLASSES = [f"k{i}" for i in range(len(LEVELS))]

# folder -> levels of its images. k7 has no folder (a checkpoint class absent from the data).
LABELLED = {"k0": [0, 0, 0], "k1": [25, 25, 60], "k2": [60, 255, 255], "k3": [100, 100],
            "k4": [150, 100], "k5": [185, 185], "k6": [0]}


def nearest(level, k=5):
    return [CLASSES[i] for i in sorted(range(len(LEVELS)), key=lambda i: abs(LEVELS[i] - level))[:k]]


def grey_resnet18(scale=200.0):
    """resnet18 whose logits are scale * (2 p_k x - p_k^2), x the mean grey (0..1), p_k = LEVELS[k]/255."""
    model = build_model("resnet18", len(CLASSES))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()  # residual branches output 0; eval BatchNorm keeps 0 at 0
        for c in range(3):  # the stem and each downsample pass the RGB channels straight through
            model.conv1.weight[c, c, 3, 3] = 1.0
            for layer in (model.layer2, model.layer3, model.layer4):
                layer[0].downsample[0].weight[c, c, 0, 0] = 1.0
        p = torch.tensor(LEVELS, dtype=torch.float32) / 255
        model.fc.weight.zero_()
        model.fc.weight[:, :3] = (scale * 2 * p / 3)[:, None]  # mean of R, G, B
        model.fc.bias.copy_(-scale * p ** 2)
    return model


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "grey.pth"
    # mean 0, std 1: inputs stay in 0..1, so the ReLUs on the identity path change nothing
    checkpoint.save(checkpoint.make(checkpoint.model_state(grey_resnet18()), arch="resnet18", classes=CLASSES,
                                    img_size=32, mean=[0, 0, 0], std=[1, 1, 1], epoch=3, metrics={},
                                    args={}), path)
    return path


def solid(path, level):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (level, level, level)).save(path)


def labelled_set(root):
    for folder, levels in LABELLED.items():
        for i, level in enumerate(levels):
            solid(root / folder / f"{folder}_{i}_grey{level}.png", level)
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score(ckpt_path, data, out, *args, check=0):
    return run_script("check_score.py", "--checkpoint", ckpt_path, "--data", data, "--out", out,
                      "--device", "cpu", "--batch-size", "5", *args, check=check)


@pytest.fixture(scope="module")
def plain_run(ckpt_path, tmp_path_factory):
    """One scoring of the labelled set, shared by the tests that read its outputs (in --out/val)."""
    root = tmp_path_factory.mktemp("plain")
    data, out = labelled_set(root / "val"), root / "score"
    return data, out / "val", score(ckpt_path, data, out)


def test_known_predictions_give_exact_scores(plain_run):
    data, out, proc = plain_run

    # Worked out by hand from LABELLED: wrong are k1's 60 (->k2), k2's two 255s (->k7), k4's 100 (->k3),
    # k6's 0 (->k0); of those, k1 and k4 are still in their image's top 5.
    s = json.loads((out / "score.json").read_text())
    assert (s["n"], s["correct"], s["top5_correct"]) == (16, 11, 13)
    assert s["top1"] == pytest.approx(11 / 16) and s["top5"] == pytest.approx(13 / 16)
    assert s["macro_recall"] == pytest.approx((1 + 2 / 3 + 1 / 3 + 1 + 1 / 2 + 1 + 0) / 7)
    assert s["classes_missing_from_data"] == ["k7"] and s["skipped"] == [] and s["tta"] is False
    assert s["most_confused"][0] == {"true": "k2", "predicted": "k7", "count": 2}

    per_class = {r["class"]: (int(r["n"]), int(r["correct"]), float(r["accuracy"]))
                 for r in read_csv(out / "per_class.csv")}
    assert per_class == {"k0": (3, 3, 1.0), "k1": (3, 2, 0.6667), "k2": (3, 1, 0.3333), "k3": (2, 2, 1.0),
                         "k4": (2, 1, 0.5), "k5": (2, 2, 1.0), "k6": (1, 0, 0.0)}

    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 16
    for r in rows:
        level = int(re.search(r"grey(\d+)", r["file"]).group(1))
        assert r["true"] == r["file"].split("/")[0]
        assert r["predicted"] == nearest(level)[0] and r["top5"].split("|") == nearest(level)
        assert 0 < float(r["confidence"]) <= 1
    # the CSVs, the JSON and the printed lines tell the same story
    assert sum(r["true"] == r["predicted"] for r in rows) == s["correct"]
    assert sum(r["true"] in r["top5"].split("|") for r in rows) == s["top5_correct"]
    assert sum(v[1] for v in per_class.values()) == s["correct"]
    assert "Top-1 accuracy: 68.75% (11/16), 95% CI 44.4-85.8%" in proc.stdout  # Wilson, worked out by hand
    assert "Top-5 accuracy: 81.25% (13/16), 95% CI" in proc.stdout
    assert s["top1_ci95"] == pytest.approx([0.4440, 0.8583], abs=5e-4)
    lo, hi = s["macro_recall_ci95"]
    assert lo < s["macro_recall"] < hi and 0 <= lo and hi <= 1
    assert f"Validation Top1 Accuracy : {100 * s['top1']:.2f}% ({data})" in proc.stdout
    assert "k2 -> k7: 2" in proc.stdout and "k7" in proc.stdout.split("not in")[1]
    assert re.search(r"\d+ images/s", proc.stdout)
    for name in ("confusion.png", "mistakes.png"):
        with Image.open(out / name) as img:
            assert img.width > 300
    assert not list(out.glob(".*"))  # no temporaries left behind


def test_tta_changes_nothing_on_a_flip_invariant_toy(ckpt_path, plain_run, tmp_path):
    data, plain_out, _ = plain_run  # solid images and a model that only sees mean colour: flip invariant
    score(ckpt_path, data, tmp_path / "tta", "--tta")
    plain, tta = (json.loads((d / "score.json").read_text()) for d in (plain_out, tmp_path / "tta" / "val"))
    assert tta["tta"] is True and plain["tta"] is False
    assert {k: v for k, v in tta.items() if k != "tta"} == {k: v for k, v in plain.items() if k != "tta"}
    assert read_csv(plain_out / "predictions.csv") == read_csv(tmp_path / "tta" / "val" / "predictions.csv")


def test_tta_averages_the_image_and_its_mirror():
    class LeftVsRight(torch.nn.Module):  # logits: mean of the left half, mean of the right half
        def forward(self, x):
            w = x.shape[3] // 2
            return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], 1)

    x = torch.zeros(1, 3, 4, 4)
    x[..., :2] = 3.0
    assert class_probs(LeftVsRight(), x)[0, 0] > 0.9
    assert class_probs(LeftVsRight(), x, tta=True)[0].tolist() == pytest.approx([0.5, 0.5])


def test_unlabelled_folder_gives_predictions_only(ckpt_path, tmp_path):
    data, out = tmp_path / "test", tmp_path / "score" / "test"
    for level in (0, 100, 255):
        solid(data / f"img_{level:03d}.png", level)
    out.mkdir(parents=True)
    (out / "score.json").write_text("{}")  # from an earlier labelled run: must not outlive it
    proc = score(ckpt_path, data, out.parent)
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "predictions.csv"]
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == ["file", "predicted", "confidence", "top5"]
    assert [(r["file"], r["predicted"], r["top5"]) for r in rows] == [
        (f"img_{v:03d}.png", nearest(v)[0], "|".join(nearest(v))) for v in (0, 100, 255)]
    assert "unlabelled" in proc.stdout


def test_unknown_class_is_an_error_that_names_it(ckpt_path, tmp_path):
    data = labelled_set(tmp_path / "val")
    solid(data / "zebra" / "z.png", 30)
    proc = score(ckpt_path, data, tmp_path / "score", check=2)
    assert "zebra" in proc.stderr and "does not know" in proc.stderr
    assert not (tmp_path / "score").exists()


def test_unreadable_files_are_named_and_not_counted(ckpt_path, tmp_path):
    data, out = labelled_set(tmp_path / "val"), tmp_path / "score"
    (data / "k0" / "empty.jpg").write_bytes(b"")
    (data / "k3" / "notes.jpg").write_text("not a photo\n")
    proc = score(ckpt_path, data, out, check=1)
    out = out / "val"
    assert "empty.jpg" in proc.stderr and "notes.jpg" in proc.stderr and "2 image file(s) skipped" in proc.stderr
    s = json.loads((out / "score.json").read_text())
    assert (s["n"], s["correct"], s["files"]) == (16, 11, 18) and len(s["skipped"]) == 2
    files = [r["file"] for r in read_csv(out / "predictions.csv")]
    assert len(files) == 16 and not any(f.endswith(("empty.jpg", "notes.jpg")) for f in files)
    # the figures count only the photos read; the summary says how many were not, skipped.csv lists them
    assert "2 of the 18 files could not be read and are in none of the figures below" in proc.stdout
    assert sorted(Path(r["file"]).name for r in read_csv(out / "skipped.csv")) == ["empty.jpg", "notes.jpg"]


def test_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w")
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload(), "arch": "resnet18", "classes": CLASSES}, evil)
    data = labelled_set(tmp_path / "val")
    proc = score(evil, data, tmp_path / "score", check=2)
    assert "refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "score").exists()


def test_help():
    proc = run_script("check_score.py", "--help", check=0)
    for flag in ("--checkpoint", "--data", "--out", "--device", "--batch-size", "--tta"):
        assert flag in proc.stdout

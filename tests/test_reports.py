"""Reports that cannot mislead: intervals that do not collapse where the photos cannot support them, curves
that stay within 0-100 % on whole epochs, scores that say which folder they measured and keep each
folder's files, mistakes that name their files, and weights that cannot be had said before any work."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_script, write_photo_set
from smalldata import intervals, plots
from test_check_score import ckpt_path, labelled_set  # noqa: F401 - the grey-level checkpoint and its photos


def test_macro_recall_on_nine_right_photos_is_no_point_interval():
    point, lo, hi = intervals.macro_recall(["111", "111", "111"])
    assert point == 1.0 and hi == 1.0 and lo < 0.8  # three photos per class cannot pin recall at 100 %


def test_macro_recall_interval_keeps_its_coverage_with_few_photos_per_class():
    """Simulated: 3 to 4 photos in each of 3 classes, true recalls near the edge; the 95 % interval must
    hold the true macro recall about 95 % of the time (the bootstrap it replaced held it far less often)."""
    rng = np.random.default_rng(0)
    truths, sizes, reps = np.array([0.95, 0.85, 0.7]), [3, 4, 3], 3000
    truth, covered = truths.mean(), 0
    for _ in range(reps):
        per_class = [(rng.random(n) < p).astype(int).tolist() for p, n in zip(truths, sizes)]
        _, lo, hi = intervals.macro_recall(per_class)
        covered += lo <= truth <= hi
    assert covered / reps >= 0.93, covered / reps


def test_curves_band_stays_within_0_and_100_and_epochs_are_whole():
    rows = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": acc, "val_acc": acc,
             "gap": 0.0, "val_n": 9} for e, acc in ((1, 0.0), (2, 50.0), (3, 100.0), (4, 100.0))]
    fig = plots.curves_figure(rows, "toy")
    ax = fig.axes[1]
    band = next(c for c in ax.collections if "SE" in str(c.get_label()))
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    assert ys.min() >= 0.0 and ys.max() <= 100.0  # 100 % on 9 photos: the band ends at 100
    fig.canvas.draw()  # (ticks are placed when drawn)
    for axis in fig.axes:
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_mistake_is_captioned_with_its_file_name():
    caption = plots.mistake_caption("/data/test/k2/k2_1_grey255.png", "k2", "k7", 0.9)
    assert caption[0][0] == "k2_1_grey255.png" and caption[1] == "true: k2" and caption[2][0] == "pred: k7 90%"


def score(ckpt, data, out, check=0):
    return run_script("check_score.py", "--checkpoint", ckpt, "--data", data, "--out", out, "--device", "cpu",
                      check=check)


def test_val_and_test_in_one_out_keep_their_own_files_and_say_which_folder(ckpt_path, tmp_path):  # noqa: F811
    val, test = labelled_set(tmp_path / "data" / "val"), labelled_set(tmp_path / "data" / "test")
    (test / "k6" / "k6_0_grey0.png").unlink()  # so the two scores differ
    out = tmp_path / "score"
    r_val, r_test = score(ckpt_path, val, out), score(ckpt_path, test, out)
    first, second = (json.loads((out / name / "score.json").read_text()) for name in ("val", "test"))
    assert (first["n"], second["n"]) == (16, 15) and first["folder"] == str(val) and second["folder"] == str(test)
    assert len((out / "val" / "predictions.csv").read_text().splitlines()) == 17  # not overwritten by the test run
    assert f"Validation Top1 Accuracy : {100 * first['top1']:.2f}% ({val})" in r_val.stdout
    assert f"Test Top1 Accuracy : {100 * second['top1']:.2f}% ({test})" in r_test.stdout

    other = labelled_set(tmp_path / "elsewhere" / "test")  # another folder of the same name, into the same --out
    r = score(ckpt_path, other, out, check=2)
    assert f"holds the score of {test}" in r.stderr and "another --out" in r.stderr
    assert json.loads((out / "test" / "score.json").read_text())["folder"] == str(test)


@pytest.mark.parametrize("name, label", [("holdout", ""), ("validation", "Validation ")])
def test_the_original_line_names_only_what_it_knows(ckpt_path, tmp_path, name, label):  # noqa: F811
    data = labelled_set(tmp_path / name)
    r = score(ckpt_path, data, tmp_path / "score")
    line = next(ln for ln in r.stdout.splitlines() if "Top1 Accuracy :" in ln)
    assert line.startswith(f"{label}Top1 Accuracy : ") and line.endswith(f"({data})")


def test_imagenet_weights_that_cannot_be_had_are_said_before_any_photo_is_decoded(tmp_path):
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=2, size=32, classes=["chelsea", "coffee"])
    write_photo_set(data / "val", per_class=1, size=32, classes=["chelsea", "coffee"])
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9")  # (no download, network or not)
    proc = subprocess.run([sys.executable, str(REPO / "model_1e-4.py"), "--data", str(data), "--out",
                           str(tmp_path / "ck"), "--arch", "resnet18", "--img-size", "32", "--weights", "imagenet",
                           "--device", "cpu", "--no-br", "--no-ocm"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ImageNet weights for resnet18 could not be loaded" in proc.stderr and "--weights none" in proc.stderr
    assert "decode" not in proc.stdout + proc.stderr and "images:" not in proc.stdout


def test_an_interval_over_runs_is_t_wide_never_degenerate_and_stays_within_what_it_measures():
    assert intervals.describe_runs([7.0, -2.0, 3.0, 1.0], signed=True) == \
        "+2.2 (95 % CI -3.8 to +8.3, t over 4 runs, under 5: rough; per run +7.0, -2.0, +3.0, +1.0)"
    assert "all 2 runs equal: no interval over runs" in intervals.describe_runs([81.0, 81.0])
    assert "one run: no interval over runs" in intervals.describe_runs([81.0])
    assert intervals.describe_runs([99.0, 90.0]).startswith("94.5 (95 % CI 37.3 to 100.0, t over 2 runs")
    assert "95 % CI -100.0 to " in intervals.describe_runs([-99.0, -10.0], signed=True)

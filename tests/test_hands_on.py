"""Working with the results by hand: the run log, summaries with details in CSV files, one meaning per
exit code, the checkpoint inspector and its ONNX export, BR's memory of its arguments, early checks."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_here, run_script, write_photo_set
from smalldata import checkpoint, cli
from smalldata.model import build_model, check_input

SMALL = ["--img-size", "32", "--batch-size", "8", "--weights", "none", "--device", "cpu", "--arch", "resnet18"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished stage 1 and stage 2 (resnet18, 32 px) with the hold-out watched."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    write_photo_set(data / "train", per_class=4, seed=1)
    write_photo_set(data / "val", per_class=2, seed=2)
    write_photo_set(data / "test", per_class=2, seed=3)
    out = root / "ck"
    s1 = run_script("model_1e-4.py", "--data", data, "--out", out, "--epochs", "2", "--watch", data / "test", *SMALL,
                    "--no-br", "--no-ocm", check=0)
    s2 = run_script("model_1e-7_ep20.py", "--data", data, "--out", out, "--epochs", "1", "--batch-size", "8",
                    "--device", "cpu", "--no-br", "--no-ocm", check=0)
    return data, out, s1, s2


def test_each_stage_writes_a_log_of_what_it_said_without_progress_bars(trained):
    data, out, s1, _ = trained
    log = (out / "stage1" / "log.txt").read_text()
    assert log.startswith("===== ") and "model_1e-4.py --data" in log.splitlines()[0]
    for line in ("== stage 1: resnet18", "epoch   2  train", "rule: divergence", "swa.pth: SWA: the mean of the weights at "
                 "the end of epochs 1-2", "the next stage starts from divergence.pth"):
        assert line in log, line
    assert "batch/s" not in log and "\r" not in log  # tqdm's bars stay on the console
    assert "epoch   1  train" in (out / "stage2" / "log.txt").read_text()
    run_script("model_1e-4.py", "--data", data, "--out", out, "--epochs", "2", *SMALL, "--no-br", "--no-ocm",
               "--rule", "last", "--fresh", check=0)
    log = (out / "stage1" / "log.txt").read_text()  # under another rule, the recipe's is replayed beside it
    assert "rule: last" in log and "the recipe's divergence rule, replayed" in log


def test_a_normal_run_shows_no_library_warning_on_the_console(trained):
    """Both stages' stderr holds their progress bars only: torch's "NumPy array is not writable" and any
    other library warning stay off the console (warnings go to log.txt)."""
    from test_quiet_console import console_lines

    _, _, s1, s2 = trained
    assert console_lines(s1.stderr) == [] and console_lines(s2.stderr) == [], s1.stderr[-2000:] + s2.stderr[-2000:]


def test_a_checkpoint_explains_itself_and_its_choice(trained):
    data, out, _, _ = trained
    ckpt = checkpoint.load(out / "divergence.pth")
    assert ckpt["preprocessing"]["resize"].startswith("the whole photo squeezed") and "bicubic" in \
        ckpt["preprocessing"]["interpolation"]
    assert ckpt["versions"]["torch"] == str(torch.__version__) and ckpt["args"]["data"] == str(data.resolve())
    assert ckpt["decision"]["file"] == "divergence.pth" and ckpt["decision"]["chosen_epoch"] == ckpt["epoch"]
    assert checkpoint.load(out / "final.pth")["decision"]["rule"] == "last"
    best = checkpoint.load(out / "stage1" / "best.pth")
    assert best["decision"]["file"] == "best.pth" and best["decision"]["rule"] == "steady-best"


def test_inspect_prints_what_a_checkpoint_is_and_compares_two(trained):
    _, out, _, _ = trained
    r = run_here("inspect_checkpoint.py", out / "final.pth", "--compare", out / "divergence.pth")
    assert r.returncode == 0, r.stderr
    for words in ("resnet18", "11,178,564 parameters", "classes (4)", "32 x 32 px", "squeezed", "epoch          1 of "
                  "stage2", "val_acc", "95% CI", "decision       final.pth by rule last", "torch ", "lr: A 1e-07  B 0.0001",
                  "largest weight differences"):
        assert words in r.stdout, words
    assert len(r.stdout) < 20_000  # not torch.load's dump of every tensor


def test_onnx_export_carries_the_preprocessing_and_matches_pytorch(trained, tmp_path):
    import onnx
    import onnxruntime

    data, out, _, _ = trained
    r = run_here("inspect_checkpoint.py", out / "final.pth", "--onnx", tmp_path / "m.onnx", "--photos", data / "test")
    assert r.returncode == 0, r.stderr
    assert "checked with onnxruntime on 4 photos" in r.stdout
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    ckpt = checkpoint.load(out / "final.pth")
    assert json.loads(meta["classes"]) == ckpt["classes"] and meta["img_size"] == "32"
    assert json.loads(meta["mean"]) == ckpt["mean"] and "squeezed" in json.loads(meta["preprocessing"])["resize"]
    x = torch.randn(3, 3, 32, 32)  # the test's own check, on a batch size the export did not see
    model = checkpoint.build_from(ckpt).eval()
    got = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)


def test_a_crash_is_exit_70_with_one_line_and_the_traceback_in_the_log(trained, monkeypatch, tmp_path):
    data, out, _, _ = trained
    from smalldata import score

    def broken(*args, **kwargs):
        raise ZeroDivisionError("an error nobody expected")
    monkeypatch.setattr(score, "report_labelled", broken)
    r = run_here("check_score.py", "--checkpoint", out / "final.pth", "--data", data / "test", "--out",
                 tmp_path / "score", "--device", "cpu")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == cli.EXIT_BUG == 70
    log = tmp_path / "score" / "test" / "log.txt"  # (--out/<scored folder>)
    assert len(lines) == 1 and "this is a bug" in lines[0] and str(log) in lines[0]
    log = log.read_text()
    assert "Traceback" in log and "an error nobody expected" in log and "Top-1 accuracy" not in log


def test_a_refused_run_leaves_no_output_folder_and_a_bug_before_one_has_its_own_file(tmp_path, monkeypatch):
    r = run_here("model_1e-4.py", "--data", tmp_path, "--out", tmp_path / "ck", "--device", "cpu")
    assert r.returncode == 2 and not (tmp_path / "ck").exists()
    from smalldata import inspection

    monkeypatch.setattr(inspection, "summary", lambda path: 1 / 0)
    ckpt = checkpoint.make(build_model("resnet18", 2).state_dict(), arch="resnet18", classes=["a", "b"], img_size=8,
                           mean=[0.5] * 3, std=[0.5] * 3, epoch=1, metrics={}, args={})
    checkpoint.save(ckpt, tmp_path / "x.pth")
    r = run_here("inspect_checkpoint.py", tmp_path / "x.pth")
    assert r.returncode == 70
    path = r.stderr.split("the traceback is in ")[1].split(";")[0]
    assert "ZeroDivisionError" in open(path).read()


def test_br_lists_refused_photos_in_a_csv_and_counts_them_by_reason(tmp_path):
    photos = write_photo_set(tmp_path / "train", per_class=2, size=80)
    for i in range(3):
        (photos / "coffee" / f"broken_{i}.jpg").write_bytes(b"not a photo")
    r = run_script("make_remove_background.py", "--src", photos, "--dst", tmp_path / "br", "--model", "u2netp",
                   "--min-confidence", "1")  # every mask refused as unsure: 8 unsure, 3 unreadable
    assert r.returncode == 1
    named = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped: ")]
    assert len(named) == cli.Problems.SHOWN  # the first few; the rest are in the CSV and the log
    assert "11 input file(s) not used as asked" in r.stderr and "8 skipped: unsure mask" in r.stderr
    assert "11 input file(s) skipped (the first 5 named above, all in" in r.stderr
    assert "3 skipped: not an image file" in r.stderr and "skipped.csv" in r.stderr
    with open(tmp_path / "br" / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11 and {r["outcome"] for r in rows} == {"skipped"}
    log = (tmp_path / "br" / "log.txt").read_text().splitlines()
    assert len([ln for ln in log if ln.startswith("skipped: ")]) == 11  # every one named in the log


def test_br_remembers_its_arguments_and_refuses_a_changed_rerun_without_fresh(tmp_path):
    photos = write_photo_set(tmp_path / "train", per_class=1, size=80, classes=["chelsea", "coffee"])
    args = ["--src", photos, "--dst", tmp_path / "br", "--model", "u2netp", "--min-confidence", "0",
            "--fallback", "copy"]
    run_script("make_remove_background.py", *args, "--masks", tmp_path / "masks", check=0)
    assert json.loads((tmp_path / "br" / "args.json").read_text())["bg_color"] == [255, 255, 255]
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 2
    again = run_script("make_remove_background.py", *args, "--masks", tmp_path / "masks", check=0)
    assert "2 already done" in again.stdout
    other = run_script("make_remove_background.py", *args, "--bg-color", "black", check=2)
    assert "other arguments" in other.stderr and "bg_color" in other.stderr and "--fresh" in other.stderr
    fresh = run_script("make_remove_background.py", *args, "--bg-color", "black", "--fresh", check=0)
    assert "removed 2 earlier output(s)" in fresh.stdout
    assert json.loads((tmp_path / "br" / "args.json").read_text())["bg_color"] == [0, 0, 0]


def test_an_architecture_that_cannot_train_at_the_size_is_refused_before_decoding(tmp_path):
    assert check_input("resnet18", 32) is None and check_input("vgg13_bn", 256) is None
    assert "it does at --img-size 224" in check_input("vit_b_16", 256)
    assert "auxiliary outputs" in check_input("googlenet", 256)
    data = write_photo_set(tmp_path / "data" / "train", per_class=1, size=16).parent
    r = run_here("model_1e-4.py", "--data", data, "--out", tmp_path / "ck", "--arch", "vit_b_16", "--weights", "none")
    assert r.returncode == 2 and "it does at --img-size 224" in r.stderr and "decode" not in r.stderr


def test_a_missing_cjk_font_is_said_once_with_the_fix(monkeypatch, capsys, tmp_path, request):
    import matplotlib

    from smalldata import plots

    monkeypatch.setattr(plots, "cjk_font_path", lambda: None)
    monkeypatch.setitem(matplotlib.rcParams, "font.family", matplotlib.rcParams["font.family"])
    plots._say_font_missing.cache_clear()
    plots._matplotlib_fonts.cache_clear()  # (set up again without the font here, and again with it after)
    request.addfinalizer(plots._matplotlib_fonts.cache_clear)
    matrix = torch.tensor([[2, 1], [0, 3]])
    plots.confusion(matrix, ["고양이", "개"], tmp_path / "a.png", "t")
    plots.confusion(matrix, ["고양이", "개"], tmp_path / "b.png", "t")
    plots.confusion(matrix, ["cat", "dog"], tmp_path / "c.png", "t")
    out = capsys.readouterr().out
    assert out.count("draw as boxes") == 1 and "pip install noto-cjk-sans-jp-regular==0.0.1" in out


def test_swa_pth_is_the_mean_of_the_last_epochs_and_an_extended_run_averages_its_stored_window(tmp_path):
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=4, seed=1)
    write_photo_set(data / "val", per_class=2, seed=2)
    out = tmp_path / "ck"
    args = ("--data", data, "--out", out, "--swa-epochs", "3", "--rule", "last", "--keep-all", "--no-br", "--no-ocm",
            *SMALL)

    def mean_of(epochs):
        kept = checkpoint.load(out / "swa.pth")
        assert kept["weights"].startswith(f"SWA: the mean of the weights at the end of epochs {epochs[0]}-{epochs[-1]}")
        assert kept["epoch"] == epochs[-1] and "val_acc" in kept["metrics"] and "SWA" in kept["decision"]["reason"]
        files = [checkpoint.load(out / "stage1" / "epochs" / f"epoch_{e:03d}.pth")["model"] for e in epochs]
        for name, value in kept["model"].items():
            if "running_" not in name and value.is_floating_point():  # (BatchNorm statistics: recomputed)
                torch.testing.assert_close(value, sum(f[name] for f in files) / len(files), rtol=1e-5, atol=1e-6)

    first = run_script("model_1e-4.py", *args, "--epochs", "6", check=0)
    assert "swa.pth: SWA: the mean of the weights at the end of epochs 4-6" in first.stdout
    mean_of([4, 5, 6])
    (out / "swa.pth").unlink()  # restored from the stage's own file, not from an epoch's
    run_script("model_1e-4.py", *args, "--epochs", "6", check=0)
    mean_of([4, 5, 6])
    longer = run_script("model_1e-4.py", *args, "--epochs", "8", check=0)  # the stored window, 3 epochs: 6-8
    assert "extending the finished run" in longer.stdout and "epochs 6-8" in longer.stdout
    mean_of([6, 7, 8])
    other = run_script("model_1e-4.py", *[a if a != "3" else "4" for a in args], "--epochs", "9", check=2)
    assert "swa_epochs: 3 -> 4" in other.stderr  # the window defines the run: not changed silently

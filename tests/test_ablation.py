"""bench/ablation.py, the one command that measures the recipe on a user's photos: a run that fails is
named and left out, and the bench goes on with the others (a 94-epoch run that failed at its very end
once ended a whole night's recording)."""
import subprocess
import sys

from conftest import REPO, write_photo_set


def test_a_failed_run_is_named_and_the_other_runs_still_go(tmp_path):
    photos = write_photo_set(tmp_path / "photos", per_class=4, size=48, classes=["astronaut", "chelsea"])
    proc = subprocess.run(
        [sys.executable, REPO / "bench" / "ablation.py", "--photos", photos, "--out", tmp_path / "out",
         "--classes", "2", "--train-per-class", "2", "--val-per-class", "1", "--test-per-class", "1",
         "--img-size", "32", "--epochs", "1", "--arch", "no_such_net", "--configs", "d", "a"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "[all:0] d: model_1e-4.py failed (2)" in proc.stderr
    assert "[all:0] a: model_1e-4.py failed (2)" in proc.stderr  # tried after d had failed
    assert "failed, left out of the tables below: all:0 d, all:0 a" in proc.stderr
    assert (tmp_path / "out" / "work" / "all-0" / "data" / "ocm" / "manifest.csv").is_file()  # prepared once


def test_the_recipes_path_and_stage_2_from_swa_are_run_and_paired(tmp_path):
    """--candidates: d keeps divergence.pth and swa.pth (the rule without stopping); e continues from the
    first (the recipe's path), e-swa from the second; the report pairs them on the same test photos."""
    photos = write_photo_set(tmp_path / "photos", per_class=4, size=48, classes=["astronaut", "chelsea"])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, REPO / "bench" / "ablation.py", "--photos", photos, "--out", out, "--classes", "2",
         "--train-per-class", "2", "--val-per-class", "1", "--test-per-class", "1", "--img-size", "32",
         "--epochs", "1", "--stage2-epochs", "1", "--arch", "resnet18", "--configs", "d", "e", "e-swa",
         "--candidates"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    d_args = (out / "work" / "all-0" / "d" / "stage1" / "args.json").read_text()
    assert '"rule": "divergence"' in d_args and '"early_stop": false' in d_args
    for name, start in (("e", "divergence.pth"), ("e-swa", "swa.pth")):
        assert (out / "histories" / f"all-0_{name}.csv").is_file()
        assert f"--init {out / 'work' / 'all-0' / 'd' / start}" in proc.stdout
    results = (out / "results.md").read_text()
    assert "Stage 2 from swa.pth minus stage 2 from divergence.pth (the recipe's path), test top-1, 1 cell(s)" in results
    assert not list((out / "work" / "all-0" / "e").rglob("*.pth"))  # stage 2's GBs are not kept

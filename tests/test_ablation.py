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

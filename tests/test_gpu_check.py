"""bench/gpu_check.sh on this CPU (GPU_CHECK_ALLOW_CPU=1, tiny sizes): its logic, not its figures. The steps
run in their order and each leaves its status and figures in results.json; a deadline skips what would
start too late; a TERM mid-step still leaves the table, the logs and what was measured."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from gpu_check_report import STEPS, status  # noqa: E402


def check(out, *args, deadline=None, wait=True):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ALLOW_CPU": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if deadline:
        env["GPU_CHECK_DEADLINE_S"] = str(deadline)
    proc = subprocess.Popen(["bash", "bench/gpu_check.sh", "--out", str(out), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.stdout_text = proc.communicate(timeout=600)[0]
    return proc


def results(out):
    return json.loads((out / "results.json").read_text())


def test_the_steps_run_in_order_and_each_leaves_its_figures(tmp_path):
    """The short form: the slower steps skipped; what runs is each step as the GPU run has it."""
    out = tmp_path / "gc"
    proc = check(out, "--skip", "throughput,torchrun1,stream,demo,compile")
    assert proc.returncode == 0, proc.stdout_text[-3000:]
    r = results(out)
    assert [s["name"] for s in r["steps"]] == STEPS
    ran = {"setup", "photos", "breakdown", "br", "ocm"}
    assert [s["status"] for s in r["steps"]] == ["ok" if s in ran else "skipped: --skip" for s in STEPS], r["steps"]
    fig = {s["name"]: s["figures"] for s in r["steps"]}
    assert fig["setup"]["GPU"] == "no GPU: the CPU run (GPU_CHECK_ALLOW_CPU=1)" and r["device"] == "cpu"
    assert fig["photos"] == {"train": 20, "val": 10, "test": 10}
    epoch = fig["breakdown"]["whole epochs"]
    parts = epoch["seconds per epoch"]
    assert set(parts) == {"train", "SWA mean", "precise BN", "eval", "keeper", "whole"}
    assert all(v > 0 for v in parts.values()) and abs(sum(parts.values()) - 2 * parts["whole"]) < 0.01
    assert epoch["precise BN"].startswith("one pass per layer (20 originals, 12 per pass)")
    assert 0 < epoch["whole / bare"] < 1 and fig["breakdown"]["--deterministic twice"]["identical"]
    assert fig["br"]["providers"] == ["CPUExecutionProvider"] and fig["br"]["done"] + 0 >= 1
    assert fig["ocm"]["images"] == 50
    assert [g["met"] for g in r["goals"][:3]] == [None] * 3, "GPU goals are not judged on a CPU"
    table = (out / "table.md").read_text()
    assert "| breakdown | ok |" in table and "a GPU goal" in table
    assert {p.name for p in (out / "logs").iterdir()} == {f"{s}.log" for s in ran}
    assert not list(tmp_path.glob("gpu-check.*")), "the work folder is removed"


def test_a_deadline_skips_what_would_start_late_and_a_term_keeps_what_was_measured(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--skip", "demo"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--out is required" in proc.stderr
    out = tmp_path / "deadline"
    proc = check(out, deadline=1)
    assert proc.returncode == 1, proc.stdout_text[-3000:]
    assert [(s["name"], s["status"]) for s in results(out)["steps"]] == \
        [("setup", "skipped: the deadline")] + [(s, "not run") for s in STEPS[1:]]
    assert (status("breakdown", "124"), status("br", "1"), status("breakdown", "1")) == \
        ("timed out", "ok (some inputs skipped)", "failed (exit 1)")
    out = tmp_path / "term"
    proc = check(out, wait=False)
    started = time.monotonic()
    while not (out / "json" / "breakdown.json").exists():  # the breakdown has measured its first part
        assert proc.poll() is None and time.monotonic() - started < 300, "the breakdown never began"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, text[-3000:]
    r = results(out)
    assert [(s["name"], s["status"]) for s in r["steps"]] == [("setup", "ok"), ("photos", "ok"),
                                                              ("breakdown", "interrupted")] + \
        [(s, "not run") for s in STEPS[3:]]
    assert "bare" in r["steps"][2]["figures"], "the parts measured before the TERM are kept"
    assert "| breakdown | interrupted |" in (out / "table.md").read_text()

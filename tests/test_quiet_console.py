"""A quiet console: Ctrl-C (SIGINT to the whole process group, as a terminal sends it) is one line and exit
130 from every process, the curves helper included; library warnings go to the run log."""
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from conftest import REPO, write_photo_set
from smalldata import INTERRUPTED
from smalldata.data import to_device

TRAIN = ("--arch", "resnet18", "--img-size", "32", "--batch-size", "8", "--weights", "none", "--device", "cpu",
         "--no-br", "--no-ocm")


def console_lines(text):
    """What a terminal shows, less tqdm's progress bars (redrawn in place with carriage returns)."""
    return [s for s in re.split(r"[\r\n]", text) if s.strip() and not re.search(r"\d+%\||\[\d\d:\d\d", s)]


def interrupt(script, *args, when, cwd=REPO, timeout=600):
    """Start the script in a process group of its own, send SIGINT to the group once when() holds, and
    return (exit code, stderr) after every process of the group has ended."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    # Ctrl-C as a terminal's foreground job gets it: a process started with SIGINT ignored (a shell's
    # background job, nohup ... &, and so this suite when run that way) passes that on to its children, and
    # Python then never turns SIGINT into KeyboardInterrupt. The script is exec'd with SIGINT at its default.
    foreground = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    proc = subprocess.Popen([sys.executable, "-c", foreground, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + timeout
    while not when() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"{script} ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    for _ in range(100):  # the helper processes end with their parent
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a process of the group outlived the interrupted run")
    return proc.returncode, err


def test_ctrl_c_during_training_with_the_curves_helper_running_is_one_line_and_130(tmp_path):
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=4, size=32, seed=1)
    write_photo_set(data / "val", per_class=2, size=32, seed=2)
    curves = tmp_path / "ck" / "stage1" / "curves.png"
    code, err = interrupt("model_1e-4.py", "--data", data, "--out", tmp_path / "ck", *TRAIN, "--epochs", "500",
                          "--rule", "last", when=curves.exists)  # (no rule ends it before the interrupt)  # the helper process has drawn: it is running
    assert code == 130 and console_lines(err) == [INTERRUPTED], err[-3000:]
    assert "interrupted" in (tmp_path / "ck" / "stage1" / "log.txt").read_text()


def test_ctrl_c_while_torch_is_imported_is_the_same_one_line(tmp_path):
    start = time.time()
    code, err = interrupt("model_1e-4.py", "--data", tmp_path, when=lambda: time.time() - start > 0.5)
    assert code == 130 and console_lines(err) == [INTERRUPTED], err[-3000:]


def test_ctrl_c_during_ocm_and_br_is_one_line_and_130(tmp_path):
    train = write_photo_set(tmp_path / "train", per_class=6, size=64, seed=1, classes=["chelsea", "coffee"])
    code, err = interrupt("make_cutmix.py", "--src", train, "--dst", tmp_path / "ocm", "--count", "50000",
                          "--img-size", "64", when=lambda: len(list(tmp_path.glob("ocm/*/*.png"))) > 5)
    assert code == 130 and console_lines(err) == [INTERRUPTED], err[-3000:]
    code, err = interrupt("make_remove_background.py", "--src", train, "--dst", tmp_path / "br", "--model", "u2netp",
                          "--min-confidence", "0", when=lambda: len(list(tmp_path.glob("br/*/*.png"))) > 1)
    assert code == 130 and console_lines(err) == [INTERRUPTED], err[-3000:]


def test_library_warnings_go_to_the_log_and_those_asking_the_user_to_act_also_to_the_console(tmp_path):
    code = (f"import sys, warnings; sys.path.insert(0, {str(REPO)!r})\n"
            "from smalldata import cli\n"
            f"cli.log_to({str(tmp_path)!r})\n"
            "warnings.warn('an internal detail of a library')\n"
            "warnings.warn('CUDA initialization: the NVIDIA driver on your system is too old')\n"
            "cli.flush_log()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    log = (tmp_path / "log.txt").read_text()
    assert "an internal detail of a library" in log and "driver on your system is too old" in log
    assert "an internal detail" not in r.stderr and "driver on your system is too old" in r.stderr


def test_the_decode_cache_reaches_torch_without_a_not_writable_warning(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4))
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")  # read-only, as cache.load maps it
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = to_device([mapped, mapped], torch.device("cpu"), chunk=1)
    assert not [w for w in seen if "not writable" in str(w.message)], [str(w.message) for w in seen]
    assert torch.equal(out, torch.from_numpy(np.concatenate([mapped, mapped])))

"""Shared test helpers: the repository's scripts run as a user runs them, on real photos."""
import base64
import contextlib
import hashlib
import io
import os
import runpy
import subprocess
import sys
import traceback
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# No test uses alpha matting: rembg's import then skips compiling pymatting's kernels, as BR does.
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

from smalldata.rembg_api import find_model  # noqa: E402

find_model("u2netp")  # points U2NET_HOME at the set-up's u2netp when rembg's folders lack it


def run_script(script, *args, cwd=None, timeout=900, check=None):
    """Run a top-level script with this interpreter; returns CompletedProcess (text)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"{script} exited {proc.returncode}, expected {check}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def run_here(script, *args):
    """Run a script as `python script args` would, but in this process; returns (returncode, stdout, stderr)."""
    from smalldata import cli

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [str(REPO / script), *map(str, args)]
    cli._Log.path, cli._Log.pending = None, []  # (a new process starts without a run log)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def skimage_photos():
    """Real photos that ship with scikit-image: one per class."""
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(),
            "coffee": data.coffee(), "rocket": data.rocket()}


def write_photo_set(root, per_class, size=64, seed=0, classes=None):
    """root/<class>/<i>.jpg: random crops of each class's photo (distinct real images per class)."""
    rng = np.random.default_rng(seed)
    photos = skimage_photos()
    for name in classes or sorted(photos):
        arr = photos[name]
        h, w = arr.shape[:2]
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ch, cw = int(h * rng.uniform(0.6, 0.95)), int(w * rng.uniform(0.6, 0.95))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            img = Image.fromarray(arr[y:y + ch, x:x + cw]).resize((size, size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(Path(root) / name / f"{name}_{i:03d}.jpg", quality=92)
    return Path(root)


def mark_stand_in_complete(data, step):
    """Give a stand-in data/br or data/ocm (plain photos a test wrote, not the step's output) the completion
    record its step writes, so training takes it: made for the classes and the photos of data/train now,
    holding the files it holds now."""
    from smalldata import records
    from smalldata.folders import find_classes

    data = Path(data)
    classes = find_classes(data / "train")
    train = records.listing(data / "train", records.class_files(data / "train", classes))
    folder = data / step
    records.write(folder, step, {"stand-in": "written by a test"}, classes, {"train": train},
                  records.listing(folder, records.class_files(folder, classes)), {})
    return folder


@pytest.fixture
def tiny_data(tmp_path):
    """data/train (4 per class) and data/val (2 per class) of the four skimage photos, 64 px."""
    data = tmp_path / "data"
    write_photo_set(data / "train", per_class=4, seed=1)
    write_photo_set(data / "val", per_class=2, seed=2)
    return data


# A fake nvidia-smi for machines without the GPU a test plays: -L lists one H200; the plain call prints
# the driver line (driver 560.35.03, CUDA 12.6) that tools/setup.sh reads.
FAKE_DRIVER, FAKE_DRIVER_CUDA = "560.35.03", "12.6"
FAKE_SMI = f'''#!/bin/sh
case "$1" in
  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-1111-2222-3333-444444444444)" ;;
  --query-gpu=*) echo "{FAKE_DRIVER}" ;;
  *) echo "| NVIDIA-SMI {FAKE_DRIVER}              Driver Version: {FAKE_DRIVER}      CUDA Version: {FAKE_DRIVER_CUDA}     |" ;;
esac
'''
NO_DEVICE_SMI = '#!/bin/sh\necho "No devices were found"\nexit 6\n'


def fake_nvidia_smi(folder, gpu=True):
    """`folder`/nvidia-smi that lists a GPU (or finds none); returns `folder`, to put first on PATH."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nvidia-smi").write_text(FAKE_SMI if gpu else NO_DEVICE_SMI)
    (folder / "nvidia-smi").chmod(0o755)
    return folder


def wheel(folder, name, files=None, version="1.0", requires=(), tag="py3-none-any"):
    """Write a minimal wheel for distribution `name` holding `files` {path: text} and depending on
    `requires` (Requires-Dist lines); returns its path. pip installs it like any other."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                   for r in requires)
    files = {**(files or {}), f"{dist}.dist-info/METADATA": meta,
             f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    path = Path(folder) / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_in, text in files.items():
            z.writestr(name_in, text)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path

"""tools/setup.sh on NVIDIA and CPU machines (issue 19, items 1 and 2), without a GPU or the network.

Each test runs a copy of tools/setup.sh in a throwaway repository layout (its own requirement files,
a stub tools/fetch_models.py and a fresh .venv), with pip limited to tiny stub wheels built here:
`torch` (whose cuda.is_available() the test chooses), `onnxruntime` and `onnxruntime-gpu` (both
providing the `onnxruntime` package, as the real ones do). A fake `nvidia-smi` first on PATH plays the
GPU. The real .venv and the network are never touched.
"""
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import FAKE_DRIVER as DRIVER, FAKE_DRIVER_CUDA as DRIVER_CUDA, REPO, fake_nvidia_smi

TORCH_CUDA = "12.4"                         # what the stub torch was "built for"

ORT_SOURCE = '''\
__version__ = "1.20.0"
FLAVOUR = {flavour!r}
_AVAILABLE = {available!r}
_SESSION_ON_CUDA = {session_on_cuda!r}  # False: CUDA is listed but its libraries fail to load


def get_available_providers():
    return list(_AVAILABLE)


class InferenceSession:
    def __init__(self, path, providers=None, **kwargs):
        wanted = [p for p in (providers or _AVAILABLE) if p in _AVAILABLE]
        if not _SESSION_ON_CUDA:
            wanted = [p for p in wanted if p != "CUDAExecutionProvider"]
        self._providers = wanted + [p for p in ["CPUExecutionProvider"] if p not in wanted]

    def get_providers(self):
        return list(self._providers)
'''

TORCH_SOURCE = '''\
__version__ = "2.5.0"
from . import cuda, version
'''


def wheel(folder, name, files, version="1.0"):
    """Write a minimal pure-Python wheel for distribution `name` holding `files` {path: text}."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {**files,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test_setup\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")


def onnxruntime_wheel(folder, gpu, available, session_on_cuda=True, cuda_version="12.2"):
    info = 'package_name = "onnxruntime"\n__version__ = "1.20.0"\n'
    if gpu:
        info += f'cuda_version = "{cuda_version}"\n'
    wheel(folder, "onnxruntime-gpu" if gpu else "onnxruntime", {
        "onnxruntime/__init__.py": ORT_SOURCE.format(flavour="gpu" if gpu else "cpu", available=available,
                                                     session_on_cuda=session_on_cuda),
        "onnxruntime/datasets/__init__.py": "def get_example(name):\n    return name\n",
        "onnxruntime/capi/__init__.py": "",
        "onnxruntime/capi/build_and_package_info.py": info,
    }, version="1.20.0")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """An empty virtual environment to copy: creating one takes 5 to 15 s on a busy 2-core machine."""
    venv = tmp_path_factory.mktemp("template") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv


@pytest.fixture
def repo(tmp_path, bare_venv):
    """A throwaway repository: tools/setup.sh (a copy), requirement files, a stub model fetch, and an
    empty .venv (the set-up's own creation of one is tested with VENV, below)."""
    root = tmp_path / "repo"
    shutil.copytree(bare_venv, root / ".venv", symlinks=True)
    (root / "tools").mkdir(parents=True)
    shutil.copy(REPO / "tools" / "setup.sh", root / "tools" / "setup.sh")
    (root / "tools" / "fetch_models.py").write_text(
        "from pathlib import Path\nPath('fetched').write_text('u2netp')\n")
    (root / "requirements.txt").write_text("torch>=2.4,<3\nonnxruntime>=1.16\n")
    (root / "requirements-test.txt").write_text("-r requirements.txt\nsetup-stub-extra\n")
    return root


def wheelhouse(tmp_path, torch_cuda=True, gpu_available=("CUDAExecutionProvider", "CPUExecutionProvider"),
               session_on_cuda=True, ort_cuda="12.2"):
    """The only packages pip may install: stub torch, onnxruntime, onnxruntime-gpu and a test extra."""
    folder = tmp_path / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    wheel(folder, "torch", {"torch/__init__.py": TORCH_SOURCE,
                            "torch/cuda.py": f"def is_available():\n    return {torch_cuda!r}\n",
                            "torch/version.py": f"cuda = {TORCH_CUDA!r}\n"}, version="2.5.0")
    wheel(folder, "setup-stub-extra", {"setup_stub_extra.py": ""})
    onnxruntime_wheel(folder, gpu=False, available=["CPUExecutionProvider"])
    onnxruntime_wheel(folder, gpu=True, available=list(gpu_available), session_on_cuda=session_on_cuda,
                      cuda_version=ort_cuda)
    return folder


def environment(tmp_path, wheels, gpu, venv=None):
    """The set-up's environment: pip offline on `wheels`, a fake nvidia-smi when `gpu`."""
    fake_bin = tmp_path / ("bin-gpu" if gpu else "bin-cpu")
    fake_bin.mkdir(exist_ok=True)
    if gpu or shutil.which("nvidia-smi"):  # on a real GPU machine, mask its nvidia-smi with a GPU-less one
        fake_nvidia_smi(fake_bin, gpu)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("VENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
               PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PIP_CONFIG_FILE=os.devnull,
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    if venv is not None:
        env["VENV"] = str(venv)
    return env


def setup(repo, env, *args, check=True):
    proc = subprocess.run(["bash", "tools/setup.sh", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"setup.sh {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def state(venv):
    """(installed onnxruntime distributions, flavour of the importable package, its providers)."""
    code = ("import importlib.metadata as m, onnxruntime as o\n"
            "names = sorted({d.metadata['Name'].lower() for d in m.distributions()} & {'onnxruntime', 'onnxruntime-gpu'})\n"
            "print(','.join(names), o.FLAVOUR, ','.join(o.get_available_providers()), sep='|')")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    names, flavour, providers = out.stdout.strip().split("|")
    return names, flavour, providers


GPU_STATE = ("onnxruntime-gpu", "gpu", "CUDAExecutionProvider,CPUExecutionProvider")
CPU_STATE = ("onnxruntime", "cpu", "CPUExecutionProvider")


@pytest.mark.parametrize("first, second, venv", [
    ((), ("test",), "elsewhere/venv"),  # VENV override: the set-up creates the environment there
    (("test",), (), None),
], ids=["main-then-test", "test-then-main"])
def test_gpu_machine_keeps_onnxruntime_gpu(tmp_path, repo, first, second, venv):
    """Item 1: a later set-up with another stamp reinstalls the CPU onnxruntime (requirements.txt asks
    for it); the set-up must still end with onnxruntime-gpu alone, and say nothing when all is done."""
    venv = tmp_path / venv if venv else repo / ".venv"
    env = environment(tmp_path, wheelhouse(tmp_path), gpu=True, venv=venv if venv.parent != repo else None)
    for i, args in enumerate((first, second)):
        proc = setup(repo, env, *args)
        assert ("== creating virtual environment" in proc.stdout) == (i == 0 and venv.parent != repo)
        assert state(venv) == GPU_STATE, proc.stdout + proc.stderr
        assert (repo / "fetched").exists(), "the model fetch runs at the end"
        (repo / "fetched").unlink()
    if venv.parent != repo:
        assert not list((repo / ".venv").glob(".installed-*")), "VENV is honoured"
    assert {p.name for p in venv.glob(".installed-*")} == {".installed-requirements", ".installed-requirements-test"}
    for args in (first, second):  # nothing to do: quiet, and still onnxruntime-gpu alone
        proc = setup(repo, env, *args)
        assert proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
        assert state(venv) == GPU_STATE
        assert (repo / "fetched").exists()


def test_cpu_machine_swaps_back(tmp_path, repo):
    """No GPU: the CPU onnxruntime, also after a GPU set-up had put onnxruntime-gpu there."""
    wheels = wheelhouse(tmp_path)
    cpu, gpu = environment(tmp_path, wheels, gpu=False), environment(tmp_path, wheels, gpu=True)
    proc = setup(repo, cpu, "test")
    assert "onnxruntime" not in proc.stdout, "the CPU path installs the requirements and nothing else"
    assert state(repo / ".venv") == CPU_STATE
    setup(repo, gpu)
    assert state(repo / ".venv") == GPU_STATE
    proc = setup(repo, cpu, "test")
    assert "installing onnxruntime (installed: onnxruntime-gpu)" in proc.stdout, proc.stdout
    assert state(repo / ".venv") == CPU_STATE
    assert setup(repo, cpu, "test").stdout == ""
    assert state(repo / ".venv") == CPU_STATE


def test_torch_without_cuda_stops_with_the_fix(tmp_path, repo):
    """Item 2: nvidia-smi sees a GPU but torch cannot use it: stop, naming the driver and PyTorch's index."""
    env = environment(tmp_path, wheelhouse(tmp_path, torch_cuda=False), gpu=True)
    proc = setup(repo, env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"driver {DRIVER}" in out and f"CUDA {DRIVER_CUDA}" in out, out
    assert "update the NVIDIA driver" in out, out
    assert "--index-url https://download.pytorch.org/whl/cu126" in out, out
    assert "torch 2.5.0" in out and "Traceback" not in out, out
    assert not (repo / "fetched").exists()


@pytest.mark.parametrize("available, session_on_cuda", [
    (("CPUExecutionProvider",), True),                          # CUDA not even listed
    (("CUDAExecutionProvider", "CPUExecutionProvider"), False),  # listed, but the session falls back
], ids=["cuda-not-listed", "session-falls-back"])
def test_onnxruntime_gpu_without_cuda_stops(tmp_path, repo, available, session_on_cuda):
    """Item 2: onnxruntime-gpu cannot use CUDA beside torch: stop, naming the versions involved."""
    wheels = wheelhouse(tmp_path, gpu_available=available, session_on_cuda=session_on_cuda, ort_cuda="11.8")
    proc = setup(repo, environment(tmp_path, wheels, gpu=True), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "onnxruntime-gpu 1.20.0 (built for CUDA 11.8)" in out, out
    assert f"torch 2.5.0 (CUDA {TORCH_CUDA})" in out and f"driver {DRIVER}" in out, out
    assert "install the onnxruntime-gpu built for torch's CUDA 12" in out, out
    assert "Traceback" not in out, out
    assert state(repo / ".venv")[0] == "onnxruntime-gpu"

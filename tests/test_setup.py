"""tools/setup.sh on NVIDIA and CPU machines, online and from an offline bundle, without a GPU or the network.

Each test runs a copy of tools/setup.sh in a throwaway repository layout (its own requirement files,
a stub tools/fetch_models.py and a fresh .venv), with pip limited to tiny stub wheels built here:
`torch` (whose cuda.is_available() and CUDA version the test chooses), `onnxruntime` and
`onnxruntime-gpu` builds for CUDA 12 and 13 (all providing the `onnxruntime` package, as the real ones
do; a GPU build's CUDA provider loads only beside a torch of its CUDA major version, as the real one
loads torch's CUDA libraries). A fake `nvidia-smi` first on PATH plays the GPU. The real .venv and the
network are never touched; the offline set-up runs with the network cut (`unshare -n`) where it can.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FAKE_DRIVER as DRIVER, FAKE_DRIVER_CUDA as DRIVER_CUDA, REPO, fake_nvidia_smi, wheel

TORCH_CUDA = "12.4"  # what the stub torch was "built for", unless a test says otherwise

ORT_SOURCE = '''\
__version__ = {version!r}
FLAVOUR = {flavour!r}
_AVAILABLE = {available!r}
_SESSION_ON_CUDA = {session_on_cuda!r}  # False: CUDA is listed but its libraries fail to load
_CUDA = {cuda!r}


def get_available_providers():
    return list(_AVAILABLE)


def _loads_beside_torch():  # the real one loads torch's CUDA libraries: another major version fails
    import torch
    return _CUDA.split(".")[0] == (torch.version.cuda or "").split(".")[0]


class InferenceSession:
    def __init__(self, path, providers=None, **kwargs):
        wanted = [p for p in (providers or _AVAILABLE) if p in _AVAILABLE]
        if not (_SESSION_ON_CUDA and _loads_beside_torch()):
            wanted = [p for p in wanted if p != "CUDAExecutionProvider"]
        self._providers = wanted + [p for p in ["CPUExecutionProvider"] if p not in wanted]

    def get_providers(self):
        return list(self._providers)
'''

TORCH_SOURCE = '''\
__version__ = "2.5.0"
from . import cuda, version
'''


def onnxruntime_wheel(folder, gpu, available, session_on_cuda=True, cuda_version="12.2", version="1.20.0"):
    info = f'package_name = "onnxruntime"\n__version__ = "{version}"\n'
    if gpu:
        info += f'cuda_version = "{cuda_version}"\n'
    wheel(folder, "onnxruntime-gpu" if gpu else "onnxruntime", {
        "onnxruntime/__init__.py": ORT_SOURCE.format(flavour="gpu" if gpu else "cpu", available=available,
                                                     session_on_cuda=session_on_cuda, cuda=cuda_version,
                                                     version=version),
        "onnxruntime/datasets/__init__.py": "def get_example(name):\n    return name\n",
        "onnxruntime/capi/__init__.py": "",
        "onnxruntime/capi/build_and_package_info.py": info,
    }, version=version)


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """An empty virtual environment to copy: creating one takes 5 to 15 s on a busy 2-core machine."""
    venv = tmp_path_factory.mktemp("template") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv


@pytest.fixture
def repo(tmp_path, bare_venv):
    """A throwaway repository: tools/setup.sh and tools/gpu_setup.py (copies), requirement files, a stub
    model fetch (it notes where the model would go), and an empty .venv (the set-up's own creation of one
    is tested with VENV, below)."""
    root = tmp_path / "repo"
    shutil.copytree(bare_venv, root / ".venv", symlinks=True)
    (root / "tools").mkdir(parents=True)
    for name in ("setup.sh", "gpu_setup.py"):
        shutil.copy(REPO / "tools" / name, root / "tools" / name)
    (root / "tools" / "fetch_models.py").write_text(
        "import os\nfrom pathlib import Path\nPath('fetched').write_text(os.environ.get('U2NET_HOME', ''))\n")
    (root / "requirements.txt").write_text("torch>=2.4,<3\nonnxruntime>=1.16\n")
    (root / "requirements-test.txt").write_text("-r requirements.txt\nsetup-stub-extra\n")
    return root


GPU_BUILDS = {"12": ("1.20.0", "12.2"), "13": ("1.28.0", "13.0")}  # stub onnxruntime-gpu releases per CUDA


def wheelhouse(tmp_path, torch_cuda=True, gpu_available=("CUDAExecutionProvider", "CPUExecutionProvider"),
               session_on_cuda=True, ort_cuda="12.2", torch_cuda_version=TORCH_CUDA, builds=("12",)):
    """The only packages pip may install: stub torch, onnxruntime, onnxruntime-gpu (one per CUDA major in
    `builds`; `ort_cuda` overrides the CUDA 12 one's) and a test extra."""
    folder = tmp_path / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    wheel(folder, "torch", {"torch/__init__.py": TORCH_SOURCE,
                            "torch/cuda.py": f"def is_available():\n    return {torch_cuda!r}\n",
                            "torch/version.py": f"cuda = {torch_cuda_version!r}\n"}, version="2.5.0")
    wheel(folder, "setup-stub-extra", {"setup_stub_extra.py": ""})
    onnxruntime_wheel(folder, gpu=False, available=["CPUExecutionProvider"])
    for major in builds:
        version, cuda = GPU_BUILDS[major]
        onnxruntime_wheel(folder, gpu=True, available=list(gpu_available), session_on_cuda=session_on_cuda,
                          cuda_version=ort_cuda if major == "12" else cuda, version=version)
    return folder


def environment(tmp_path, wheels, gpu, venv=None):
    """The set-up's environment: pip offline on `wheels` (None: no pip settings, as --offline sets its
    own), a fake nvidia-smi when `gpu`."""
    fake_bin = tmp_path / ("bin-gpu" if gpu else "bin-cpu")
    fake_bin.mkdir(exist_ok=True)
    if gpu or shutil.which("nvidia-smi"):  # on a real GPU machine, mask its nvidia-smi with a GPU-less one
        fake_nvidia_smi(fake_bin, gpu)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("VENV", "PYTHONPATH", "PYTHONHOME", "U2NET_HOME")}
    env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, HOME=str(tmp_path),
               PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    if wheels is not None:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    if venv is not None:
        env["VENV"] = str(venv)
    return env


def network_cut():
    """The command prefix that runs a command without a network (`unshare -n`: root, or user namespaces),
    or none where this machine allows no such thing (then pip's --no-index, which --offline sets, is the proof)."""
    ok = shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    return ["unshare", "-n"] if ok else []


def setup(repo, env, *args, check=True, prefix=()):
    proc = subprocess.run([*prefix, "bash", "tools/setup.sh", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"setup.sh {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def state(venv):
    """(installed onnxruntime distributions, flavour of the importable package, its providers, version)."""
    code = ("import importlib.metadata as m, onnxruntime as o\n"
            "names = sorted({d.metadata['Name'].lower() for d in m.distributions()} & {'onnxruntime', 'onnxruntime-gpu'})\n"
            "print(','.join(names), o.FLAVOUR, ','.join(o.get_available_providers()), o.__version__, sep='|')")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    return tuple(out.stdout.strip().split("|"))


GPU_STATE = ("onnxruntime-gpu", "gpu", "CUDAExecutionProvider,CPUExecutionProvider", "1.20.0")
CPU_STATE = ("onnxruntime", "cpu", "CPUExecutionProvider", "1.20.0")


@pytest.mark.parametrize("first, second, venv", [
    ((), ("test",), "elsewhere/venv"),  # VENV override: the set-up creates the environment there
    (("test",), (), None),
], ids=["main-then-test", "test-then-main"])
def test_gpu_machine_keeps_onnxruntime_gpu(tmp_path, repo, first, second, venv):
    """A later set-up with another stamp installs the requirements again (requirements.txt asks for the CPU
    onnxruntime); the set-up must still end with onnxruntime-gpu alone, and say nothing when all is done."""
    venv = tmp_path / venv if venv else repo / ".venv"
    env = environment(tmp_path, wheelhouse(tmp_path), gpu=True, venv=venv if venv.parent != repo else None)
    for i, args in enumerate((first, second)):
        proc = setup(repo, env, *args)
        assert ("== creating virtual environment" in proc.stdout) == (i == 0 and venv.parent != repo)
        assert state(venv) == GPU_STATE, proc.stdout + proc.stderr
        assert (repo / "fetched").read_text() == "", "the model fetch runs, into the environment's own folder"
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
    assert "installing onnxruntime (installed: onnxruntime-gpu 1.20.0)" in proc.stdout, proc.stdout
    assert state(repo / ".venv") == CPU_STATE
    assert setup(repo, cpu, "test").stdout == ""
    assert state(repo / ".venv") == CPU_STATE


@pytest.mark.parametrize("torch_cuda, build", [("12.4", "12"), ("13.0", "13")])
def test_onnxruntime_gpu_is_the_build_for_torchs_cuda(tmp_path, repo, torch_cuda, build):
    """Both builds at hand: the set-up takes the one for torch's CUDA major version, not the newest (a CUDA
    13 build beside a CUDA 12 torch runs on the CPU), and the GPU check passes; a venv holding the other
    build gets this one."""
    wheels = wheelhouse(tmp_path, torch_cuda_version=torch_cuda, builds=("12", "13"))
    env = environment(tmp_path, wheels, gpu=True)
    other = GPU_BUILDS["13" if build == "12" else "12"][0]
    subprocess.run([str(repo / ".venv/bin/python"), "-m", "pip", "install", "-q", f"onnxruntime-gpu=={other}"],
                   env=env, check=True)
    proc = setup(repo, env)
    version = GPU_BUILDS[build][0]
    assert state(repo / ".venv") == (*GPU_STATE[:3], version), proc.stdout + proc.stderr
    assert f"for torch's CUDA {build}; installed: onnxruntime-gpu {other}" in proc.stdout, proc.stdout
    assert setup(repo, env).stdout == ""


def test_torch_without_cuda_stops_with_the_fix_after_fetching_the_model(tmp_path, repo):
    """nvidia-smi sees a GPU but torch cannot use it: stop, naming the driver and PyTorch's index; the
    model was fetched first, so background removal still works offline."""
    env = environment(tmp_path, wheelhouse(tmp_path, torch_cuda=False), gpu=True)
    proc = setup(repo, env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"driver {DRIVER}" in out and f"CUDA {DRIVER_CUDA}" in out, out
    assert "update the NVIDIA driver" in out, out
    assert "--index-url https://download.pytorch.org/whl/cu126" in out, out
    assert "torch 2.5.0" in out and "Traceback" not in out, out
    assert (repo / "fetched").exists()


@pytest.mark.parametrize("available, session_on_cuda", [
    (("CPUExecutionProvider",), True),                          # CUDA not even listed
    (("CUDAExecutionProvider", "CPUExecutionProvider"), False),  # listed, but the session falls back
], ids=["cuda-not-listed", "session-falls-back"])
def test_onnxruntime_gpu_without_cuda_stops(tmp_path, repo, available, session_on_cuda):
    """onnxruntime-gpu cannot use CUDA beside torch: stop, naming the versions involved and the release range
    to install; the model was fetched before."""
    wheels = wheelhouse(tmp_path, gpu_available=available, session_on_cuda=session_on_cuda, ort_cuda="11.8")
    proc = setup(repo, environment(tmp_path, wheels, gpu=True), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "onnxruntime-gpu 1.20.0 (built for CUDA 11.8)" in out, out
    assert f"torch 2.5.0 (CUDA {TORCH_CUDA})" in out and f"driver {DRIVER}" in out, out
    assert "install the onnxruntime-gpu built for torch's CUDA 12" in out, out
    assert "pip install --force-reinstall 'onnxruntime-gpu>=1.19,<1.27'" in out, out
    assert "Traceback" not in out, out
    assert state(repo / ".venv")[0] == "onnxruntime-gpu"
    assert (repo / "fetched").exists()


def test_offline_into_a_system_python_with_the_network_cut(tmp_path, repo, bare_venv):
    """--offline DIR --system: everything from the bundle folder alone, with the network cut, into the Python
    PYTHON names (a copy of a bare venv stands for a GPU box's system Python, its onnxruntime already there),
    the model into ~/.u2net. A bundle without onnxruntime-gpu leaves the CPU one with a note, and the GPU
    check passes for torch; a rerun changes nothing."""
    system = tmp_path / "system"
    shutil.copytree(bare_venv, system, symlinks=True)
    wheels = wheelhouse(tmp_path)
    subprocess.run([str(system / "bin/python"), "-m", "pip", "install", "-q", "onnxruntime"],
                   env=environment(tmp_path, wheels, gpu=False), check=True)  # the box's own, not in the bundle
    for bundled in wheels.glob("onnxruntime*.whl"):
        bundled.unlink()
    env = {**environment(tmp_path, None, gpu=True), "PYTHON": str(system / "bin/python")}
    for _ in range(2):
        proc = setup(repo, env, "--offline", wheels, "--system", prefix=network_cut())
        assert "has no onnxruntime-gpu>=1.19,<1.27" in proc.stdout and "runs on the CPU" in proc.stdout, proc.stdout
        assert state(system) == CPU_STATE
        assert (repo / "fetched").read_text() == str(tmp_path / ".u2net")
    assert not list((repo / ".venv").glob(".installed-*")), "the venv is left alone"
    listed = subprocess.run([str(system / "bin/python"), "-m", "pip", "list"], capture_output=True, text=True).stdout
    assert "torch" in listed and "setup-stub-extra" not in listed


def test_offline_needs_a_bundle(tmp_path, repo):
    env = environment(tmp_path, None, gpu=False)
    for args, words in ((["--offline", tmp_path / "nowhere"], "no wheels there"), (["--offline"], "needs the bundle"),
                        (["--cuda"], "unknown argument")):
        proc = setup(repo, env, *args, check=False)
        assert proc.returncode == 2 and proc.stdout == "" and words in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr

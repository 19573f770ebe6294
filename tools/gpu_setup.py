"""The set-up's GPU steps (tools/setup.sh runs them; only the standard library and, for `want --gpu` and
`check`, the environment's torch and onnxruntime).

    python tools/gpu_setup.py want [--gpu]     # the onnxruntime build to install, or nothing when it is there
    python tools/gpu_setup.py installed        # the onnxruntime distributions installed
    python tools/gpu_setup.py check [--cpu-onnxruntime]   # torch (and onnxruntime-gpu) really use the GPU
    python tools/gpu_setup.py requirement CUDA_MAJOR      # onnxruntime-gpu's releases for that CUDA

onnxruntime-gpu loads torch's CUDA libraries (smalldata/rembg_api.py), so its CUDA major version must be
torch's. Which release is built for which CUDA, read from PyPI's wheels (the `cuda_version` in
onnxruntime/capi/build_and_package_info.py and the nvidia-*-cu12 / -cu13 extras of their metadata) and
onnxruntime's install notes (CUDA 12 the default from 1.19 on): up to 1.18 CUDA 11.8, 1.19 to 1.26
CUDA 12, 1.27 on CUDA 13. Unpinned, pip takes the newest, whatever torch's CUDA.
"""
import re
import subprocess
import sys

BUILDS = {11: ("1.16", "1.19"), 12: ("1.19", "1.27"), 13: ("1.27", None)}  # CUDA major -> [from, before)


def gpu_requirement(cuda_major):
    """The pip requirement of the onnxruntime-gpu releases built for `cuda_major` (unpinned when unknown)."""
    if int(cuda_major) not in BUILDS:
        return "onnxruntime-gpu"
    low, high = BUILDS[int(cuda_major)]
    return f"onnxruntime-gpu>={low}" + (f",<{high}" if high else "")


def release(version):
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def fits(version, cuda_major):
    low, high = BUILDS.get(int(cuda_major), ("0", None))
    return release(low) <= release(version) and (high is None or release(version) < release(high))


def installed():
    """{name: version} of the onnxruntime distributions installed (the CPU and the GPU one share a folder)."""
    import importlib.metadata as metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name in ("onnxruntime", "onnxruntime-gpu"):
            found[name] = dist.version
    return found


def want(gpu):
    """(requirement, why) of the onnxruntime build this environment lacks, or None when it has it: exactly
    the CPU one without a GPU; with one, exactly the onnxruntime-gpu built for torch's CUDA major."""
    have = installed()
    listed = ", ".join(f"{n} {v}" for n, v in sorted(have.items())) or "neither"
    if not gpu:
        return None if list(have) == ["onnxruntime"] else ("onnxruntime", f"installed: {listed}")
    import torch

    if not torch.version.cuda:
        return None  # a CPU-only torch: `check` stops with the fix
    major = torch.version.cuda.split(".")[0]
    if list(have) == ["onnxruntime-gpu"] and fits(have["onnxruntime-gpu"], major):
        return None
    return gpu_requirement(major), f"for torch's CUDA {major}; installed: {listed}"


def stop(problem, fix):
    sys.exit(f"tools/setup.sh: {problem}\nFix: {fix}")


def check(cpu_onnxruntime):
    """Stop with the fix when torch, or onnxruntime-gpu (unless the CPU one was kept on purpose), cannot use
    the GPU: the scripts would otherwise run on the CPU. Prints nothing when all is well."""
    py = sys.executable
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    driver = (re.search(r"Driver Version:\s*(\S+)", smi) or [None, "unknown"])[1]
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi)
    cu = f"cu{cuda[1]}{cuda[2]}" if cuda else "cuXXX"  # PyTorch's index for the driver's CUDA version
    driver_says = f"NVIDIA driver {driver} (CUDA {cuda[1] + '.' + cuda[2] if cuda else 'unknown'})"
    torch_fix = (f"{py} -m pip install --force-reinstall torch torchvision --index-url "
                 f"https://download.pytorch.org/whl/{cu}\n  (if that index does not exist, the nearest lower "
                 "cuXXX listed on https://pytorch.org/get-started/locally/)")
    import torch

    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    if not torch.cuda.is_available():
        stop(f"nvidia-smi sees a GPU, {driver_says}, but torch {torch.__version__} ({built}) cannot use it: "
             "training with --device auto would stop with this error.",
             (f"update the NVIDIA driver to one for CUDA {torch.version.cuda}, or " if torch.version.cuda else "")
             + f"install the torch build for this driver:\n  {torch_fix}")
    if cpu_onnxruntime:
        return
    import onnxruntime as ort
    from importlib.metadata import version

    try:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # as smalldata/rembg_api.py does: CUDA libraries from torch's wheels
        from onnxruntime.datasets import get_example

        ok, error = "CUDAExecutionProvider" in ort.get_available_providers(), ""
        if ok:  # listed, but its CUDA libraries may still fail to load: then a session falls back to the CPU
            session = ort.InferenceSession(get_example("sigmoid.onnx"), providers=["CUDAExecutionProvider"])
            ok = "CUDAExecutionProvider" in session.get_providers()
    except Exception as e:
        ok, error = False, f" ({type(e).__name__}: {str(e)[:300]})"
    if not ok:
        try:
            from onnxruntime.capi.build_and_package_info import cuda_version as ort_cuda
        except ImportError:
            ort_cuda = "unknown"
        torch_cuda = torch.version.cuda or "?"
        major = torch_cuda.split(".")[0]
        stop(f"onnxruntime-gpu {version('onnxruntime-gpu')} (built for CUDA {ort_cuda}) cannot run on the GPU "
             f"beside torch {torch.__version__} (CUDA {torch_cuda}), {driver_says}; providers "
             f"{ort.get_available_providers()}{error}: background removal would run on the CPU.",
             f"install the onnxruntime-gpu built for torch's CUDA {major} (which release is built for which "
             "CUDA and cuDNN: https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html"
             f"#requirements):\n  {py} -m pip install --force-reinstall '{gpu_requirement(major)}'\nor, if the "
             "CUDA major versions already match, the CUDA and cuDNN libraries it needs (onnxruntime's error "
             f"above names them):\n  {py} -m pip install '{gpu_requirement(major)}' 'onnxruntime-gpu[cuda,cudnn]'")


def main(argv):
    command = argv[0] if argv else ""
    if command == "want":
        wanted = want("--gpu" in argv)
        if wanted:
            print(*wanted, sep="|")
    elif command == "installed":
        print(*installed())
    elif command == "check":
        check("--cpu-onnxruntime" in argv)
    elif command == "requirement" and len(argv) == 2 and argv[1].isdigit():
        print(gpu_requirement(argv[1]))
    else:
        print(f"usage:\n{__doc__.split(chr(10) * 2)[1]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])

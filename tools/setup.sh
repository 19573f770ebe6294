#!/usr/bin/env bash
# Idempotent set-up: the virtual environment (.venv), the requirements, and rembg's u2netp model
# (into .venv/u2net, offline-safe). `tools/setup.sh test` adds the test requirements.
# On an NVIDIA machine it also makes sure torch and onnxruntime-gpu really use the GPU, and stops
# with the fix when they would not: the scripts would otherwise run on the CPU with only a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
reqs=requirements.txt
[ "${1:-}" = test ] && reqs=requirements-test.txt
# pip below is always the environment's
pip() { "$VENV/bin/python" -m pip -q --no-cache-dir --disable-pip-version-check "$@"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# Reinstall only when the requirement files change.
want=$(cat requirements.txt "$reqs" | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$(basename "$reqs" .txt)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing $reqs (first time: several minutes, torch is large)"
  pip install -r "$reqs"
  echo "$want" > "$stamp"
fi

# onnxruntime (CPU) and onnxruntime-gpu share one package folder, so exactly one may be installed:
# the GPU one when nvidia-smi lists a GPU. Every install above puts the CPU one back (requirements.txt
# asks for it) over onnxruntime-gpu, whose metadata stays: so look at both, on every run.
gpu=
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep '^GPU ' >/dev/null; then gpu=1; fi
ort=onnxruntime; [ -n "$gpu" ] && ort=onnxruntime-gpu
have=$("$VENV/bin/python" -c 'import importlib.metadata as m
names = {(d.metadata.get("Name") or "").lower().replace("_", "-") for d in m.distributions()}
print(*sorted(names & {"onnxruntime", "onnxruntime-gpu"}))')
if [ "$have" != "$ort" ]; then
  echo "== ${gpu:+NVIDIA GPU found: }installing $ort (installed: ${have:-neither})"
  # Uninstalling either one deletes the shared folder, so remove both and install the one wanted.
  [ -z "$have" ] || pip uninstall -y $have
  pip install "$ort"
fi

# With a GPU, check that both runtimes use it (nothing is printed when they do). torch is a range in
# requirements.txt and may resolve to a build for a newer driver; onnxruntime-gpu may be built for
# another CUDA major version than torch's CUDA libraries (which it loads, see smalldata/rembg_api.py).
if [ -n "$gpu" ]; then
  "$VENV/bin/python" - "$VENV/bin/python" <<'EOF'
import re, subprocess, sys
py = sys.argv[1]
smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
driver = (re.search(r"Driver Version:\s*(\S+)", smi) or [None, "unknown"])[1]
cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi)
cu = f"cu{cuda[1]}{cuda[2]}" if cuda else "cuXXX"  # PyTorch's index for the driver's CUDA version
driver_says = f"NVIDIA driver {driver} (CUDA {cuda[1] + '.' + cuda[2] if cuda else 'unknown'})"
torch_fix = (f"{py} -m pip install --force-reinstall torch torchvision --index-url "
             f"https://download.pytorch.org/whl/{cu}\n  (if that index does not exist, the nearest lower "
             "cuXXX listed on https://pytorch.org/get-started/locally/)")

def stop(problem, fix):
    sys.exit(f"tools/setup.sh: {problem}\nFix: {fix}")

import torch
built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
if not torch.cuda.is_available():
    stop(f"nvidia-smi sees a GPU, {driver_says}, but torch {torch.__version__} ({built}) cannot use it: "
         "training with --device auto would run on the CPU.",
         (f"update the NVIDIA driver to one for CUDA {torch.version.cuda}, or " if torch.version.cuda else "")
         + f"install the torch build for this driver:\n  {torch_fix}")

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
    stop(f"onnxruntime-gpu {version('onnxruntime-gpu')} (built for CUDA {ort_cuda}) cannot run on the GPU "
         f"beside torch {torch.__version__} (CUDA {torch_cuda}), {driver_says}; providers "
         f"{ort.get_available_providers()}{error}: background removal would run on the CPU.",
         f"install the onnxruntime-gpu built for torch's CUDA {torch_cuda.split('.')[0]} (which release is "
         "built for which CUDA and cuDNN: https://onnxruntime.ai/docs/execution-providers/"
         f"CUDA-ExecutionProvider.html#requirements):\n  {py} -m pip install --force-reinstall "
         "'onnxruntime-gpu==VERSION'\nor, if the CUDA major versions already match, the CUDA and cuDNN "
         f"libraries it needs (onnxruntime's error above names them):\n  {py} -m pip install "
         "'onnxruntime-gpu[cuda,cudnn]'")
EOF
fi
"$VENV/bin/python" tools/fetch_models.py

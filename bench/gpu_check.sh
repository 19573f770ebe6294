#!/usr/bin/env bash
# Every GPU measurement in one run of under 9 minutes on one H100/H200, for the day a device is lent.
# Each step reports its figures and the check goes on when one fails; the end is one table.
#
#   bash bench/gpu_check.sh PHOTOS [RESULTS]     # PHOTOS: a <class>/<image> folder of real photos
#
# Steps (each with a time limit): the set-up's GPU checks (torch sees the GPU, onnxruntime-gpu's CUDA
# provider loads); bench/gpu_readiness.py (host syncs per epoch, keeper cost, whole epochs against
# bare training, layout conversions, torch.compile, a CPU last.pth resumed here, --deterministic, peak
# memory); bench/train_speed.py (ours against the torchvision ImageFolder loop, 256 px bf16); background
# removal on the GPU; stage 1 under torchrun with one worker (DDP with its all-reduce) and streamed from
# the decode cache; the demo pipeline in its GPU configuration. Needs the set-up done (tools/setup.sh),
# PHOTOS, and data/ holding the demo data (tools/make_demo_data.py). Results in RESULTS
# (default /tmp/smalldata-gpu): every step's log, figures.json and the table.
set -uo pipefail   # (no -e: a failed step is reported in the table, and the next one runs)
cd "$(dirname "$0")/.."
photos=${1:?usage: bash bench/gpu_check.sh PHOTOS [RESULTS]}
results=${2:-/tmp/smalldata-gpu}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
: > "$results/steps.tsv"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, note its exit code and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name" | tee -a "$results/check.log"
  timeout "$limit" "$@" > "$results/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$results/$name.log" | tee -a "$results/check.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$results/steps.tsv"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$results/device.txt"
step setup 120 "$py" -c "import torch, onnxruntime as ort; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, torch.cuda.get_device_name()); print('onnxruntime providers', ort.get_available_providers()); \
assert 'CUDAExecutionProvider' in ort.get_available_providers()"
step readiness 150 "$py" bench/gpu_readiness.py --images "$photos" --json "$results/readiness.json"
step train_speed 120 "$py" bench/train_speed.py --images "$photos" --json "$results/train_speed.json"
step br 90 "$py" make_remove_background.py --src "$photos" --dst "$results/br" --model u2netp --fallback copy --fresh
step torchrun1 90 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 model_1e-4.py --data data \
  --out "$results/torchrun1" --epochs 3 --weights none --no-br --no-ocm --fresh
step stream 90 "$py" model_1e-4.py --data data --out "$results/stream" --epochs 3 --weights none --no-br --no-ocm \
  --data-on stream --fresh
step demo 420 "$py" tools/demo.py --out "$results/demo"

"$py" - "$results" <<'EOF'
import json, re, sys
from pathlib import Path
r = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((r / name).read_text())
    except (OSError, ValueError):
        return {}
def grep(name, pattern, group=1):
    try:
        found = re.findall(pattern, (r / f"{name}.log").read_text())
        return found[-1] if found else "-"
    except OSError:
        return "-"
ready, speed = load("readiness.json"), load("train_speed.json")
rows = [
    ("training images/s at 256 px, bf16 (ours)", speed.get("ours images/s", "-"), ">= 4000"),
    ("ours / torchvision ImageFolder loop, same run", speed.get("ours / baseline", "-"), ">= 4"),
    ("whole epochs / bare training (measure + keeper)", ready.get("whole epochs / bare", "-"), ">= 0.85"),
    ("host syncs per epoch (bar aside)", ready.get("host syncs per epoch", "-"), "2"),
    ("keeper / bare", ready.get("keeper / bare", "-"), "~1"),
    ("peak GPU memory GiB", ready.get("peak GPU memory GiB", "-"), ""),
    ("TFLOP/s", speed.get("TFLOP/s", "-"), ""),
    ("BR images/s", grep("br", r"([\d.]+) images/s \(model load"), ""),
    ("BR providers", grep("br", r"providers (\S+)"), "CUDAExecutionProvider"),
    ("torchrun, 1 worker: images/s, last epoch", grep("torchrun1", r"(\d+) img/s"), ""),
    ("streamed: images/s, last epoch", grep("stream", r"(\d+) img/s"), ""),
    ("demo: validation top-1", grep("demo", r"Validation Top-1 accuracy: ([\d.]+%)"), ""),
    ("demo: hold-out test top-1", grep("demo", r"Hold-out test Top-1 accuracy: ([\d.]+%)"), ""),
]
lines = ["| figure | measured | goal |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
steps = [line.split("\t") for line in (r / "steps.tsv").read_text().splitlines()]
lines += ["", "| step | exit | seconds |", "|---|---|---|"] + [f"| {n} | {c}{' (timed out)' if c == '124' else ''} | {s} |"
                                                             for n, c, s in steps]
(r / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

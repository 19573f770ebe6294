#!/usr/bin/env bash
# The GPU measurements in one run (a few minutes on an H100/H200): the GPU-only paths
# (bench/gpu_readiness.py: host syncs, checkpoint writer cost, layout conversions, recompiles, a CPU
# last.pth resumed on CUDA, --deterministic twice, peak memory), the BR providers line, training throughput of ours
# against the torchvision-tutorial baseline, then the whole pipeline on the demo data in the GPU
# configuration (256 px, 500 OCM, up to 100 + 20 epochs, val and test scores), with each step's wall time;
# then stage 1 streamed from the decode cache (--data-on stream) and under torchrun with one worker.
#
#   bash bench/gpu_check.sh PHOTOS [RESULTS]     # PHOTOS: a <class>/<image> folder of real photos
#
# Needs torch, torchvision and requirements.txt importable by python3, the u2netp model in
# $U2NET_HOME (tools/fetch_models.py puts it there) and data/ holding the demo data
# (tools/make_demo_data.py). Prints everything and keeps a copy in RESULTS (default
# /tmp/smalldata-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
photos=${1:?usage: bash bench/gpu_check.sh PHOTOS [RESULTS]}
results=${2:-/tmp/smalldata-gpu}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$results/device.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$results/device.txt"
python3 bench/gpu_readiness.py --images "$photos" 2>&1 | tee "$results/gpu_readiness.txt"
python3 make_remove_background.py --src "$photos" --dst "$results/br" --model u2netp --fallback copy 2>&1 \
  | grep -E "providers|summary|warning" | tee "$results/br_providers.txt"
python3 bench/train_speed.py --images "$photos" --pipeline 2>&1 | tee "$results/train_speed.txt"
cp checkpoints/score/score.json "$results/score_val.json"
cp checkpoints/score-test/score.json "$results/score_test.json"
cp checkpoints/1e-4/metrics.csv "$results/metrics_1e-4.csv"
cp checkpoints/1e-7/metrics.csv "$results/metrics_1e-7.csv"
cp checkpoints/1e-4/curves.png "$results/curves_1e-4.png"
# Streaming from the decode cache against the in-memory run above, and torchrun with one worker
# (DDP's own overhead), 3 stage-1 epochs each on the demo data at 256 px: images/s per epoch.
python3 model_1e-4.py --data data --out "$results/stream" --epochs 3 --weights none --data-on stream 2>&1 \
  | grep -E "^data:|^epoch " | tee "$results/stream.txt"
python3 -m torch.distributed.run --standalone --nproc_per_node=1 model_1e-4.py --data data \
  --out "$results/torchrun1" --epochs 3 --weights none 2>&1 | grep -E "workers|^epoch " | tee "$results/torchrun1.txt"

#!/usr/bin/env bash
# Every GPU measurement in one run of at most 7 minutes on a bare GPU machine, for the day a device is lent.
#
#   PYTHON=python3 bash bench/gpu_check.sh --out DIR [--bundle WHEELS]
#   GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh --out /tmp/gc       # the same steps on a CPU, tiny sizes
#
# PYTHON: the Python to use (default: .venv/bin/python when there is one, else python3, a GPU box's own
# with its torch). --bundle WHEELS: first install what is missing from tools/offline_bundle.sh's folder
# into that Python (tools/setup.sh --offline WHEELS --system; no network needed). The data are made here:
# the demo photos (tools/make_demo_data.py), then BR and OCM on them. The steps, cheap first, compile last:
#   setup       versions; torch and onnxruntime-gpu really use the GPU (tools/gpu_setup.py check)
#   photos      the demo photos (and a copy for the demo step)
#   breakdown   stage-1 epochs at the recipe's size, part by part (bench/gpu_readiness.py breakdown)
#   throughput  ours against the plain torchvision ImageFolder loop, same run (bench/train_speed.py)
#   br, ocm     background removal on the GPU, then One-class CutMix
#   torchrun1   stage 1 under torchrun with one process (DDP and its all-reduce)
#   stream      stage 1 with --data-on stream
#   demo        tools/demo.py, shortened
#   compile     torch.compile (bench/gpu_readiness.py compile)
# Each step has a time limit, and the whole run a deadline of 7 minutes (GPU_CHECK_DEADLINE_S): a step that
# would start after it is skipped. After every step, and on any exit (the end, a failure, Ctrl-C, a kill by
# TERM), DIR gets results.json (every step's status, seconds and figures) and table.md, with the steps' logs
# and the small files they wrote. The goal (bench/gpu_check_report.py GOALS): on an H100/H200 at 256 px in
# bf16, >= 4,000 training images/s, >= 4x the plain torchvision loop, and whole stage-1 epochs >= 85 % of the
# bare step rate. --skip STEP,... leaves steps out (a shorter run). Exit 0 when every step ran to its end
# (or was left out with --skip), 1 when one failed, timed out or missed the deadline, 2 for a wrong
# argument, 130 / 143 when interrupted by Ctrl-C / TERM.
set -uo pipefail   # (no -e: a failed step is reported, and the next one runs)
usage() { echo "bench/gpu_check.sh: $1 (usage: bash bench/gpu_check.sh --out DIR [--bundle WHEELS] [--skip STEP,...])" >&2; exit 2; }
out= bundle= skip=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage "--out needs a folder"; out=$2; shift ;;
    --bundle) [ $# -ge 2 ] && [ -d "$2" ] || usage "--bundle needs the bundle's folder"; bundle=$(cd "$2" && pwd); shift ;;
    --skip) [ $# -ge 2 ] || usage "--skip needs step names"; skip=",$2,"; shift ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift
done
[ -n "$out" ] || usage "--out is required"
mkdir -p "$out" && out=$(cd "$out" && pwd) || usage "cannot write to --out $out"
cd "$(dirname "$0")/.."
rm -rf "$out/logs" "$out/json" "$out/files" "$out/results.json" "$out/table.md"  # (an earlier run's)
mkdir -p "$out/logs" "$out/json" "$out/files"
: > "$out/steps.tsv"
py=${PYTHON:-python3}
[ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || py=.venv/bin/python
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
export PYTHONUNBUFFERED=1 NUMBA_DISABLE_JIT=1 MPLCONFIGDIR="$work/matplotlib" TORCH_HOME="$work/torch"
limit_all=${GPU_CHECK_DEADLINE_S:-420}
deadline=$((SECONDS + limit_all))
cpu=  # tiny sizes: asked for, and no GPU here
if [ "${GPU_CHECK_ALLOW_CPU:-}" = 1 ] && ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  cpu=1
fi

report() {  # results.json and table.md from what the steps left (any Python: the report needs no packages)
  local reporter=$py
  "$reporter" -c '' 2>/dev/null || reporter=python3
  "$reporter" bench/gpu_check_report.py "$out" "$work" --elapsed "$SECONDS" --deadline "$limit_all" "$@"
}
finish() {  # on every exit: the running step stopped, the table, the small files the steps wrote; then the work goes
  local code=$?
  trap - EXIT INT TERM
  if [ -n "${child:-}" ]; then  # a step was running: stop it, and say so
    kill -TERM "$child" 2>/dev/null
    wait "$child" 2>/dev/null
    printf '%s\tinterrupted\t%s\n' "$current" "$((SECONDS - started))" >> "$out/steps.tsv"
  fi
  (cd "$work" && find . -type f -size -2M \( -name '*.json' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' \
     -o -name '*.md' \) -not -path './data/*' -not -path './demo-data/*' -not -path './matplotlib/*' -print0 |
     xargs -0 -r cp --parents -t "$out/files") 2>/dev/null
  report --print --exit-code
  local verdict=$?
  rm -rf "$work"
  exit $(( code ? code : verdict ))
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() {  # step NAME LIMIT COMMAND...: within its limit and the deadline; its log, exit code and seconds
  local name=$1 limit=$2 left=$((deadline - SECONDS)) rc
  current=$name started=$SECONDS
  shift 2
  if [[ $skip == *",$name,"* ]]; then
    printf '%s\tskipped: --skip\t0\n' "$name" >> "$out/steps.tsv"
  elif [ "$left" -lt 15 ]; then
    printf '%s\tskipped: the deadline\t0\n' "$name" >> "$out/steps.tsv"
  else
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (at most $limit s; $left s left of the run)"
    timeout -k 10 "$limit" "$@" > "$out/logs/$name.log" 2>&1 &
    child=$!
    wait "$child"  # (in the background and waited for: a TERM to this script is handled at once)
    rc=$?
    child=
    tail -n 6 "$out/logs/$name.log" | cut -c1-200
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$out/steps.tsv"
  fi
  report
}

# The sizes: the recipe's on a GPU; tiny on a CPU (GPU_CHECK_ALLOW_CPU=1), where the same code paths run.
if [ -n "$cpu" ]; then
  photos=(--train 2 --val 1 --test 1)
  ready=(--arch resnet18 --img-size 32 --batch-size 8 --train 32 --originals 20 --val-n 10 --bn-chunk 12 --epochs 1)
  compile=(--arch resnet18 --img-size 32 --batch-size 8 --train 16 --backend aot_eager)
  speed=(--arch resnet18 --img-size 32 --batch-size 8 --steps 4 --warmup 1 --workers 2)
  size=32 stage=(--arch resnet18 --img-size 32 --batch-size 8 --epochs 1)
  demo=(--small --epochs 1 1)
else
  photos=() ready=() compile=() speed=(--img-size 256 --batch-size 64) size=256 stage=(--epochs 3) demo=(--epochs 5 2)
fi
data=$work/data
json=$out/json
if [ -n "$bundle" ]; then
  step setup 240 bash -c 'PYTHON="$1" bash tools/setup.sh --offline "$2" --system && "$1" bench/gpu_readiness.py setup --json "$3"' \
    _ "$py" "$bundle" "$json/setup.json"
else
  step setup 120 "$py" bench/gpu_readiness.py setup --json "$json/setup.json"
fi
if ! grep -q $'^setup\t0\t' "$out/steps.tsv"; then
  echo "set-up failed (its log: $out/logs/setup.log): the other steps need it" >&2
  exit 1
fi
step photos 60 bash -c '"$1" tools/make_demo_data.py --data "$2/data" "${@:3}" && cp -r "$2/data" "$2/demo-data"' \
  _ "$py" "$work" "${photos[@]}"
step breakdown 90 "$py" bench/gpu_readiness.py breakdown --images "$data/train" --val "$data/val" --json "$json/breakdown.json" \
  "${ready[@]}"
step throughput 75 "$py" bench/train_speed.py --images "$data/train" --json "$json/throughput.json" "${speed[@]}"
step br 60 "$py" make_remove_background.py --src "$data/train" --dst "$data/br" --model u2netp --fallback copy
n_train=$(find "$data/train" -type f -name '*.png' | wc -l)
step ocm 30 "$py" make_cutmix.py --src "$data/train" --dst "$data/ocm" --count $((n_train * 5 / 2)) --img-size "$size"
step torchrun1 60 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 model_1e-4.py --data "$data" \
  --out "$work/torchrun1" --weights none --fresh "${stage[@]}"
step stream 60 "$py" model_1e-4.py --data "$data" --out "$work/stream" --weights none --fresh --data-on stream "${stage[@]}"
step demo 200 "$py" tools/demo.py --data "$work/demo-data" --out "$work/demo" --weights none "${demo[@]}"
step compile 120 "$py" bench/gpu_readiness.py compile --images "$data/train" --json "$json/compile.json" "${compile[@]}"

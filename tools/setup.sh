#!/usr/bin/env bash
# Idempotent set-up: the virtual environment (.venv), the requirements, and rembg's u2netp model
# (into .venv/u2net, offline-safe). `tools/setup.sh test` adds the test requirements.
#
#   bash tools/setup.sh [test] [--offline DIR] [--system]
#
# --offline DIR: install from a bundle made by tools/offline_bundle.sh only (pip --no-index
# --find-links DIR), the model included: nothing is downloaded. --system: into the Python that
# PYTHON names (python3 by default; a GPU box's own, with its torch), u2netp into ~/.u2net
# (U2NET_HOME when set), instead of .venv.
# On an NVIDIA machine it also installs the onnxruntime-gpu built for torch's CUDA and makes sure
# torch and onnxruntime-gpu really use the GPU, and stops with the fix when they would not.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
reqs=requirements.txt offline= system=
usage() { echo "tools/setup.sh: $1 (usage: bash tools/setup.sh [test] [--offline DIR] [--system])" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    test) reqs=requirements-test.txt ;;
    --offline) [ $# -ge 2 ] || usage "--offline needs the bundle's folder"; offline=$2; shift ;;
    --system) system=1 ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift
done
if [ -n "$offline" ]; then
  ls "$offline"/*.whl >/dev/null 2>&1 || usage "--offline $offline: no wheels there (tools/offline_bundle.sh makes them)"
  # Every pip below, the model's fetch included, reads only the bundle.
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$(cd "$offline" && pwd)
fi

if [ -n "$system" ]; then
  py=${PYTHON:-python3}
  export U2NET_HOME=${U2NET_HOME:-$HOME/.u2net}  # where rembg itself looks: no environment variable needed later
  stamp=
else
  py=$VENV/bin/python
  if [ ! -x "$py" ]; then
    echo "== creating virtual environment $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  stamp="$VENV/.installed-$(basename "$reqs" .txt)"
fi
# pip below is always the chosen Python's
pip() { "$py" -m pip -q --no-cache-dir --disable-pip-version-check "$@"; }

gpu=
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep '^GPU ' >/dev/null; then gpu=1; fi
# onnxruntime (CPU) and onnxruntime-gpu share one package folder, so exactly one may be installed. With a
# GPU the requirements go in without the CPU one (requirements.txt asks for it), and the GPU one follows.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in requirements.txt requirements-test.txt; do
  if [ -n "$gpu" ]; then grep -vE '^onnxruntime([^-_.a-zA-Z0-9]|$)' "$f" > "$tmp/$f"; else cp "$f" "$tmp/$f"; fi
done
# Reinstall only when the requirement files change (a system Python: pip checks every time).
want=$(cat "$tmp/requirements.txt" "$tmp/$reqs" | sha256sum | cut -c1-16)
if [ -z "$stamp" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ -n "$stamp" ]; then echo "== installing $reqs${offline:+ from $offline} (first time: several minutes, torch is large)"
  else echo "== $reqs into $py${offline:+ from $offline} (pip installs what it lacks)"; fi
  pip install -r "$tmp/$reqs"
  [ -z "$stamp" ] || echo "$want" > "$stamp"
fi

# The model first: a GPU check below that stops the set-up must not leave BR without it.
"$py" tools/fetch_models.py

# Exactly one onnxruntime: the CPU one, or with a GPU the onnxruntime-gpu built for torch's CUDA major
# version (unpinned, pip would take the newest, built for whichever CUDA). Looked at on every run: an
# install of the requirements puts the CPU one back over onnxruntime-gpu, whose metadata stays.
cpu_ort=
IFS='|' read -r ort why <<< "$("$py" tools/gpu_setup.py want ${gpu:+--gpu})"
if [ -n "$ort" ] && [ -n "$offline" ] && [ -n "$gpu" ] && ! pip install --dry-run --no-deps "$ort" >/dev/null 2>&1; then
  echo "== NVIDIA GPU found, but $offline has no $ort ($why): background removal runs on the CPU" \
       "(a bundle made without --cpu-onnxruntime has it)"
  cpu_ort=1
  IFS='|' read -r ort why <<< "$("$py" tools/gpu_setup.py want)"
fi
if [ -n "$ort" ]; then
  echo "== ${gpu:+NVIDIA GPU found: }installing $ort ($why)"
  # Uninstalling either one deletes the shared folder, so remove both and install the one wanted.
  installed=$("$py" tools/gpu_setup.py installed)
  [ -z "$installed" ] || pip uninstall -y $installed
  pip install "$ort"
fi

# With a GPU, check that both runtimes use it (nothing is printed when they do). torch is a range in
# requirements.txt and may resolve to a build for a newer driver.
[ -z "$gpu" ] || "$py" tools/gpu_setup.py check ${cpu_ort:+--cpu-onnxruntime}

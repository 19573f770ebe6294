#!/usr/bin/env bash
# Idempotent set-up: the virtual environment (.venv), the requirements, and rembg's u2netp model
# (into .venv/u2net, offline-safe). `tools/setup.sh test` adds the test requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
reqs=requirements.txt
[ "${1:-}" = test ] && reqs=requirements-test.txt

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# Reinstall only when the requirement files change.
want=$(cat requirements.txt "$reqs" | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$(basename "$reqs" .txt)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing $reqs (first time: several minutes, torch is large)"
  "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check -r "$reqs"
  echo "$want" > "$stamp"
fi
# On an NVIDIA machine, background removal runs on the GPU with onnxruntime-gpu. It and onnxruntime
# share one package folder, so exactly one of them may be installed.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
    && ! "$VENV/bin/python" -m pip show onnxruntime-gpu >/dev/null 2>&1; then
  echo "== NVIDIA GPU found: onnxruntime-gpu instead of onnxruntime"
  "$VENV/bin/python" -m pip uninstall -q -y onnxruntime
  "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check onnxruntime-gpu
fi
"$VENV/bin/python" tools/fetch_models.py

#!/usr/bin/env bash
# Quick start 1: set up, write the demo data, run the whole pipeline, print the score.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
source tools/env.sh
"$VENV/bin/python" tools/make_demo_data.py
exec "$VENV/bin/python" tools/demo.py "$@"

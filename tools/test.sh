#!/usr/bin/env bash
# Quick start 2: set up with the test requirements and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh test
source tools/env.sh
exec "$VENV/bin/python" -m pytest "$@"

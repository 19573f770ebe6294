#!/usr/bin/env bash
# An offline bundle for a machine without internet (tools/offline_bundle.py --help says what it holds):
# run it where PyPI can be reached, carry the folder over, and there run bash tools/setup.sh --offline FOLDER.
#
#   bash tools/offline_bundle.sh --python 3.12 --platform manylinux_2_28_x86_64 --have have.txt --out wheels/
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/offline_bundle.py" "$@"

#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with ktrain, TensorFlow (CPU build) and the
# test tools. Safe to re-run. Pass extras to add engines, e.g. `bash scripts/setup.sh gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu},test"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "ktrain is set up in .venv: run .venv/bin/ktrain --help"

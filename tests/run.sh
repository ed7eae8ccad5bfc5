#!/usr/bin/env bash
# The test command: the whole suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests "$@"

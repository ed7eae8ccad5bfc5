#!/usr/bin/env bash
# Install megatron_lite and its dependencies. On a machine without torch this installs the
# CPU build pinned for this project (a local wheel on the project's machines); where torch
# is already installed (e.g. a CUDA build on a GPU node) it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e .

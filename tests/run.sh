#!/usr/bin/env bash
# The test command, for a fresh machine too: install megatron_lite with what the tests need
# (torch's pinned CPU build where no torch is installed), then run the whole suite (GPU tests
# skip themselves without CUDA). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
python -m pip install -q -e ".[test]"
python -m pytest -q tests "$@"

"""Training flags with CUDA-only effects, through `pretrain_gpt.py` on one GPU:
`--deterministic-mode` makes two runs print identical lines (bf16, flash attention, fused
cross-entropy included); the nsys capture range (`--profile` without the torch profiler),
`--empty-unused-memory-level 2` and `--manual-gc` run and change no printed value."""
import pytest

from tests.functional.test_checkpoint_cli import _rows
from tests.functional.test_pretrain_cli import torchrun
from tests.gpu.test_cuda_checkpoint import CUDA_GPT

pytestmark = pytest.mark.gpu


def test_deterministic_mode_repeats_and_chores_change_nothing():
    flags = [*CUDA_GPT, "--deterministic-mode", "--cross-entropy-loss-fusion"]
    first = _rows(torchrun(1, "pretrain_gpt.py", *flags).stdout)
    again = _rows(torchrun(1, "pretrain_gpt.py", *flags, "--profile", "--profile-step-start", "2",
                           "--profile-step-end", "4", "--empty-unused-memory-level", "2", "--manual-gc",
                           "--manual-gc-interval", "2").stdout)
    assert len(first) == 8 and again == first

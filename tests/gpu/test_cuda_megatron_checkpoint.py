"""`--load` of Megatron-LM's own checkpoints on CUDA (NCCL, CUDA RNG states restored from
Megatron's rng_state): the resumed run prints Megatron's iteration 3-4 losses, on 1 GPU and at
TP=2 on 2 GPUs (Megatron wrote them on H200s: GPU numerics on both sides)."""
import pytest
import torch

from tests.functional.test_megatron_checkpoint_cli import COMMON, FIXTURES, LLAMA, _check, _megatron_rows
from tests.functional.test_pretrain_cli import iteration_lines, torchrun

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name,flags,nproc,rtol", [
    ("gpt_tp1", COMMON, 1, 1e-5),
    ("llama_tp1_bf16_distopt", COMMON + LLAMA, 1, 5e-4),
    ("llama_tp1_bf16_distopt", COMMON + LLAMA + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
     2, 5e-4),
], ids=["gpt-fp32", "llama-bf16", "llama-bf16-tp2"])
def test_megatron_checkpoint_continues_on_cuda(name, flags, nproc, rtol):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    out = torchrun(nproc, "pretrain_gpt.py", *flags, "--distributed-backend", "nccl",
                   "--load", str(FIXTURES / name)).stdout
    _check({int(r[0]): r for r in iteration_lines(out)}, _megatron_rows(name), rtol=rtol)

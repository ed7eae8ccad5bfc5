"""The memory-scaling layouts on CUDA (issue 17), through `pretrain_llama.py`: FSDP2 on 2 GPUs
(NCCL, bf16 gathers, with CP, full recompute, bf16 reduction) and the CPU-offloaded optimizer
on one GPU (pinned staging, side-stream copies) print the one-GPU bf16 curve; an FSDP2
checkpoint continues with the distributed optimizer and offloaded state (DTensors with host
tensors, NCCL assembly on the device); the memory estimate is close to the measured peak; a
Llama-3-8B layout that cannot fit one GPU is refused before allocating anything."""
import re

import pytest
import torch

from tests.functional.test_pretrain_cli import torchrun
from tests.gpu.test_cuda_layouts_cli import LLAMA, _close, _curve, _two_gpus

pytestmark = pytest.mark.gpu

FSDP2 = ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"]
MEMORY = re.compile(r"max allocated: ([\d.]+)")
ESTIMATE = re.compile(r"memory estimate per GPU .*; total ([\d.]+)")
# Llama-3-8B's shape (tools/bench/memory_scaling.sh uses the same).
LLAMA3_8B = """--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--group-query-attention --num-query-groups 8 --seq-length 2048 --max-position-embeddings 8192
--tokenizer-type NullTokenizer --vocab-size 128256 --mock-data --eval-iters 0 --bf16
--distributed-backend nccl""".split()


@pytest.fixture(scope="module")
def llama_bf16():
    return _curve(1, "pretrain_llama.py", *LLAMA, "--bf16")


@pytest.mark.parametrize("layout", [
    FSDP2,
    [*FSDP2, "--context-parallel-size", "2"],
    [*FSDP2, *"--recompute-granularity full --recompute-method uniform --recompute-num-layers 1".split()],
    [*FSDP2, "--grad-reduce-in-bf16"],
    [*FSDP2, "--torch-fsdp2-no-reshard-after-forward"],
], ids=["fsdp2-dp2", "fsdp2-cp2", "fsdp2-dp2-recompute", "fsdp2-dp2-bf16-reduce", "fsdp2-dp2-no-reshard"])
def test_fsdp2_prints_the_one_gpu_curve(llama_bf16, layout):
    _two_gpus()
    rtol = 2e-2 if "--grad-reduce-in-bf16" in layout else 5e-3  # bf16 sums of 2 partial gradients
    _close(_curve(2, "pretrain_llama.py", *LLAMA, "--bf16", *layout), llama_bf16, rtol=rtol)


@pytest.mark.parametrize("layout", [
    ["--optimizer-cpu-offload"],
    ["--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5", "--overlap-cpu-optimizer-d2h-h2d"],
    ["--use-distributed-optimizer", "--optimizer-cpu-offload", "--overlap-cpu-optimizer-d2h-h2d"],
], ids=["offload-1.0", "offload-0.5-overlap", "distopt-offload-1.0-overlap"])
def test_cpu_offload_prints_the_one_gpu_curve(llama_bf16, layout):
    # The host step is torch's fused CPU AdamW, the device one the fused CUDA kernel.
    _close(_curve(1, "pretrain_llama.py", *LLAMA, "--bf16", *layout), llama_bf16, rtol=5e-3)


def test_fsdp2_checkpoint_continues_with_offloaded_distributed_optimizer(tmp_path, llama_bf16):
    _two_gpus()
    ckpt = str(tmp_path / "ckpt")
    torchrun(2, "pretrain_llama.py", *LLAMA, "--bf16", *FSDP2, "--save", ckpt, "--save-interval", "15",
             "--exit-interval", "15")
    offload = "--use-distributed-optimizer --optimizer-cpu-offload --optimizer-offload-fraction 0.5 " \
        "--overlap-cpu-optimizer-d2h-h2d --save-interval 25 --exit-interval 25".split()
    resumed = _curve(2, "pretrain_llama.py", *LLAMA, "--bf16", *offload, "--load", ckpt, "--save", ckpt)
    # A run's first line (16) resets no average, so the later lines average what the
    # uninterrupted run's do (spec §3.2 'Cadence').
    assert sorted(resumed) == [16, 20, 25]
    _close({it: resumed[it] for it in (20, 25)}, {it: llama_bf16[it] for it in (20, 25)}, rtol=5e-3)
    # ... and the offloaded checkpoint back into FSDP2.
    again = _curve(2, "pretrain_llama.py", *LLAMA, "--bf16", *FSDP2, "--load", ckpt)
    assert sorted(again) == [26, 30]
    _close({30: again[30]}, {30: llama_bf16[30]}, rtol=5e-3)


@pytest.mark.parametrize("layout", [[], ["--use-distributed-optimizer"], FSDP2],
                         ids=["dp-plain", "distopt", "fsdp2"])
def test_memory_estimate_is_close_to_the_measured_peak(layout):
    """A 0.6B Llama (static memory dominates): the printed estimate within 25 % of the
    allocator's max allocated after two logged iterations."""
    nproc = 2 if layout else 1
    if nproc == 2:
        _two_gpus()
    flags = """--num-layers 12 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16
    --seq-length 1024 --max-position-embeddings 1024 --tokenizer-type NullTokenizer --vocab-size 32000
    --micro-batch-size 2 --global-batch-size 8 --train-iters 4 --lr 1e-4 --mock-data --log-interval 2
    --eval-iters 0 --bf16 --distributed-backend nccl""".split()
    out = torchrun(nproc, "pretrain_llama.py", *flags, *layout).stdout
    estimate = float(ESTIMATE.search(out).group(1))
    peak = float(MEMORY.findall(out)[-1])
    assert 0.75 * peak <= estimate <= 1.25 * peak, (estimate, peak)


def test_llama3_8b_on_one_gpu_needs_offload():
    flags = LLAMA3_8B + "--micro-batch-size 1 --global-batch-size 64 --train-iters 2 --lr 1e-4".split()
    if torch.cuda.get_device_properties(0).total_memory > 160 * 2**30:
        pytest.skip("a GPU that holds an 8B model with its Adam state")
    proc = torchrun(1, "pretrain_llama.py", *flags, check=False)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    error = [ln for ln in lines if ln.startswith("error: this layout needs")]
    assert error and "--optimizer-cpu-offload --optimizer-offload-fraction" in error[0], proc.stdout[-2000:]

"""`pretrain_*.py` on CUDA through torchrun, compared number by number: the same tiny model
prints the same loss curve at TP=2+SP (fused vocab-parallel cross-entropy), DP=2 (with and
without overlapped reduction, and with the distributed optimizer's overlapped param gather),
and PP=2 x VPP=2 as on one GPU, and GPT (learned positions) at TP=2+SP in fp32; bf16
training tracks fp32 over many steps; fp16 exercises the dynamic loss scaler. (These replace
the print-only scripts tests/gpu/*.sh.)"""
import re

import pytest
import torch

from tests.functional.test_pretrain_cli import torchrun

pytestmark = pytest.mark.gpu

LINE = re.compile(r"iteration +(\d+)/.*lm loss: (\S+) \| loss scale: (\S+) \|")
LLAMA = """--num-layers 4 --hidden-size 512 --num-attention-heads 8 --group-query-attention
--num-query-groups 4 --seq-length 512 --max-position-embeddings 512 --tokenizer-type NullTokenizer
--vocab-size 32000 --micro-batch-size 4 --global-batch-size 16 --train-iters 30 --lr 1e-3
--lr-warmup-iters 4 --lr-decay-style cosine --mock-data --log-interval 5 --eval-iters 0 --seed 1234
--attention-dropout 0 --hidden-dropout 0 --distributed-backend nccl""".split()
GPT_FP32 = """--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256
--max-position-embeddings 256 --tokenizer-type NullTokenizer --vocab-size 1024 --micro-batch-size 2
--global-batch-size 8 --train-iters 10 --lr 1e-3 --lr-warmup-iters 2 --mock-data --log-interval 1
--eval-iters 0 --seed 1234 --attention-dropout 0 --hidden-dropout 0 --distributed-backend nccl""".split()


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")


def _curve(nproc, script, *flags):
    proc = torchrun(nproc, script, *flags)
    rows = [LINE.search(line) for line in proc.stdout.splitlines()]
    return {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in rows if m}


def _close(curve, reference, rtol):
    assert sorted(curve) == sorted(reference) and curve, (curve, reference)
    for it, (loss, _) in curve.items():
        assert abs(loss - reference[it][0]) <= rtol * reference[it][0], (it, curve, reference)


@pytest.fixture(scope="module")
def llama_bf16():
    return _curve(1, "pretrain_llama.py", *LLAMA, "--bf16")


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--cross-entropy-loss-fusion"],
    [],
    ["--overlap-grad-reduce"],
    ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"],
], ids=["tp2-sp-fused-ce", "dp2", "dp2-overlap", "dp2-distopt-overlap"])
def test_two_gpu_layouts_print_the_one_gpu_curve(llama_bf16, layout):
    _two_gpus()
    # bf16 with other reduction orders: equal to bf16 rounding over 30 steps, not bitwise.
    _close(_curve(2, "pretrain_llama.py", *LLAMA, "--bf16", *layout), llama_bf16, rtol=5e-3)


def test_pp2_vpp2_fp32_equals_one_gpu():
    _two_gpus()
    single = _curve(1, "pretrain_gpt.py", *GPT_FP32)
    piped = _curve(2, "pretrain_gpt.py", *GPT_FP32, "--pipeline-model-parallel-size", "2",
                   "--num-layers-per-virtual-pipeline-stage", "1")
    _close(piped, single, rtol=1e-5)


def test_gpt_tp2_sp_fp32_equals_one_gpu():
    """GPT's learned positions under SP: the vocabulary shards are reduce-scattered, then each
    TP rank adds its chunk's positions and the table's gradient is summed over TP."""
    _two_gpus()
    single = _curve(1, "pretrain_gpt.py", *GPT_FP32)
    tp = _curve(2, "pretrain_gpt.py", *GPT_FP32, "--tensor-model-parallel-size", "2", "--sequence-parallel")
    _close(tp, single, rtol=1e-5)


def test_bf16_training_tracks_fp32(llama_bf16):
    fp32 = _curve(1, "pretrain_llama.py", *LLAMA)
    _close(llama_bf16, fp32, rtol=2e-2)
    assert llama_bf16[30][0] < llama_bf16[5][0] - 0.5  # it learns, not just starts alike


def test_fp16_dynamic_loss_scaler():
    curve = _curve(1, "pretrain_gpt.py", *GPT_FP32[:-2], "--train-iters", "30", "--fp16",
                   "--initial-loss-scale", "4294967296", "--log-interval", "1")
    assert min(scale for _, scale in curve.values()) < 4294967296  # overflows backed the scale off
    assert all(loss == loss and loss < 20 for loss, _ in curve.values())  # finite, sane
    assert curve[30][0] < curve[min(curve)][0]

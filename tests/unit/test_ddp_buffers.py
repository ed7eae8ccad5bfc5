"""Buffer and bucket layout of spec §8.1, bucket-size resolution, and the single-process
behaviour of the DDP wrapper (views, accumulation over micro-batches, no_sync, NaN checks)."""
import contextlib
import math

import pytest
import torch

from megatron_lite.data_parallel.buffers import ParamAndGradBuffer, plan_layout
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel, default_bucket_size
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.training.train_step import train_step
from tests.dp_utils import CPU, build_trainable, micro_batches


def test_distributed_layout_aligns_params_and_pads_buckets():
    sizes = [100, 30, 500, 7, 1000]
    layout = plan_layout(sizes, bucket_size=600, shared=[False] * 5, dp_size=3, distributed=True)
    starts = [s for s, _, _ in layout.index]
    assert all(s % 64 == 0 for s in starts)
    assert [b for _, _, b in layout.index] == [0, 0, 0, 1, 1]  # bucket 0 closes at >= 600 elements
    align = math.lcm(3, 128)
    for start, end, unpadded in layout.buckets:
        assert start % align == 0 and end % align == 0 and unpadded <= end - start
    assert layout.buckets[0][2] == starts[2] + 500  # unpadded: up to the end of its last param
    assert layout.numel == layout.buckets[-1][1]


def test_plain_layout_is_dense_and_shared_param_gets_own_bucket_only_when_sharded():
    sizes, shared = [10, 20, 30], [False, True, False]
    dense = plan_layout(sizes, bucket_size=None, shared=shared, dp_size=4, distributed=False)
    assert dense.index == [(0, 10, 0), (10, 30, 0), (30, 60, 0)] and dense.numel == 60
    sharded = plan_layout(sizes, bucket_size=None, shared=shared, dp_size=4, distributed=True)
    assert [b for _, _, b in sharded.index] == [0, 1, 2]
    assert sharded.index[1][0] == sharded.buckets[1][0]  # the tied embedding starts its bucket


def test_bucket_size_resolution():
    assert default_bucket_size(None, None, 10**9, 8, overlap_grad_reduce=False) is None
    assert default_bucket_size(None, None, 10**9, 8, overlap_grad_reduce=True) == 40_000_000
    assert default_bucket_size(None, None, 10**9, 64, overlap_grad_reduce=True) == 64_000_000
    assert default_bucket_size(1234, None, 10**9, 8, overlap_grad_reduce=True) == 1234
    assert default_bucket_size(None, 4, 1000, 8, overlap_grad_reduce=True) == 250
    assert default_bucket_size(1234, None, 10**9, 8, overlap_grad_reduce=True, pp_rank=1) is None
    assert default_bucket_size(1234, None, 10**9, 8, overlap_grad_reduce=True, chunk_index=1) is None


def test_params_become_views_of_the_buffers():
    a = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    b = torch.nn.Parameter(torch.arange(5.0))
    buf = ParamAndGradBuffer([a, b], torch.float32, dp_size=2, bucket_size=None, distributed=True)
    assert buf.params == [b, a]  # reverse registration order
    torch.testing.assert_close(a.detach(), torch.arange(6.0).view(2, 3))  # values kept
    assert a.data_ptr() == buf.param_data[buf.param_range[a][0]:].data_ptr()
    a.main_grad.fill_(1.0)
    start, end = buf.param_range[a]
    assert buf.grad_data[start:end].sum() == 6 and buf.grad_data.sum() == 6
    assert buf.numel % 128 == 0


def test_grads_accumulate_in_fp32_over_micro_batches_of_a_bf16_model():
    ps = ParallelState.create()
    lin = torch.nn.Linear(4, 3, dtype=torch.bfloat16)
    ddp = DistributedDataParallel(lin, ps, DDPConfig(overlap_grad_reduce=True))
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    for i in range(3):
        with ddp.no_sync() if i < 2 else contextlib.nullcontext():
            ddp(x).float().sum().backward()
    ddp.finish_grad_sync()
    assert lin.weight.main_grad.dtype == torch.float32 and lin.weight.grad is None
    torch.testing.assert_close(lin.weight.main_grad, torch.full((3, 4), 6.0))
    torch.testing.assert_close(lin.bias.main_grad, torch.full((3,), 6.0))
    ddp.zero_grad_buffer()
    assert ddp.param_buffers[0].grad_data.abs().sum() == 0


def test_nan_checks_name_the_bucket_or_the_loss():
    ps = ParallelState.create()
    model, ddp, opt = build_trainable(ps, {"check_for_nan_in_grad": True})
    data = micro_batches(model.config.vocab_size, 0, 1)
    params = dict(model.named_parameters())
    # A norm's weight: with gradient-accumulation fusion a linear weight's or bias's gradient
    # goes straight into main_grad, and a tensor hook on it sees only the placeholder.
    handle = params["decoder.final_layernorm.weight"].register_hook(lambda g: g * float("nan"))
    with pytest.raises(RuntimeError, match="found NaN in local grad norm for bucket #0 in backward pass"):
        train_step(ddp, opt, data, 2, ps, CPU)
    handle.remove()
    with torch.no_grad():
        params["decoder.final_layernorm.weight"].fill_(float("nan"))
    with pytest.raises(RuntimeError, match="found NaN or Inf in local forward loss calculation"):
        train_step(ddp, opt, data, 2, ps, CPU)

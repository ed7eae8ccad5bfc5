"""Gradient-accumulation fusion on one process: the in-place wgrad accumulation against its
unfused reference, the placeholder protocol with DDP's hook, the fallback for weights
without a main_grad, and the flag reaching the model config."""
import pytest
import torch

from megatron_lite.config.arguments import parse_args
from megatron_lite.config.configs import model_config_from_args
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.fused.wgrad import _require_mixed_dtype_addmm, accumulate_wgrad_, reference
from megatron_lite.models.init import init_parameter
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _operands(dtype, tokens=24, out=6, inp=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, out, generator=g).to(dtype), torch.randn(tokens, inp, generator=g).to(dtype),
            torch.randn(out, inp, generator=g))


def test_fp32_accumulates_in_place_like_the_reference():
    grad_out, x, start = _operands(torch.float32)
    fused, unfused = start.clone(), start.clone()
    ptr = fused.data_ptr()
    accumulate_wgrad_(fused, grad_out, x)
    reference(unfused, grad_out, x)
    assert fused.data_ptr() == ptr
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)


def test_bf16_operands_accumulate_in_fp32():
    grad_out, x, start = _operands(torch.bfloat16)
    fused = start.clone()
    accumulate_wgrad_(fused, grad_out, x)
    exact = start.double() + grad_out.double().t() @ x.double()
    torch.testing.assert_close(fused.double(), exact, rtol=1e-6, atol=1e-6)  # no bf16 rounding of the GEMM


def _layers(fused: bool):
    torch.manual_seed(0)
    col = ColumnParallelLinear(8, 12, tp_group=None, gradient_accumulation_fusion=fused)
    row = RowParallelLinear(12, 8, tp_group=None, gradient_accumulation_fusion=fused)
    for i, layer in enumerate((col, row)):
        init_parameter(layer.weight, f"{i}.weight", 0, 0.02, 1, 0, 1)
    return torch.nn.Sequential(col, torch.nn.GELU(), row)


def test_fused_layers_under_ddp_match_plain_autograd_over_micro_batches():
    ps = ParallelState.create()
    x = torch.randn(4, 2, 8)  # [s, b, h]
    plain = _layers(fused=False)
    for _ in range(3):
        plain(x).square().sum().backward()
    model = _layers(fused=True)
    ddp = DistributedDataParallel(model, ps, DDPConfig(overlap_grad_reduce=True))
    for i in range(3):
        ddp.enable_grad_sync(i == 2)
        ddp(x).square().sum().backward()
    ddp.finish_grad_sync()
    for (name, p), ref in zip(model.named_parameters(), plain.parameters()):
        assert p.grad is None and not p.grad_added_to_main_grad, name
        torch.testing.assert_close(p.main_grad, ref.grad, rtol=1e-6, atol=1e-6, msg=name)


def test_without_a_main_grad_the_gradient_goes_to_grad():
    model = _layers(fused=True)  # not wrapped in DDP: no main_grad, so nothing to fuse into
    model(torch.randn(4, 2, 8)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_flag_reaches_the_model_config():
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--max-position-embeddings", "32"]
    for extra, expected in (([], True), (["--no-gradient-accumulation-fusion"], False)):
        args = parse_args(base + extra)
        args.padded_vocab_size = 128
        assert model_config_from_args(args).gradient_accumulation_fusion is expected


def test_a_main_grad_the_mixed_gemm_cannot_take_is_refused_naming_the_flag():
    """The weight and bias paths share one check: a non-fp32 main_grad (or a torch without
    addmm.dtype_out) is refused with the flag that turns the fusion off, never a slow fallback."""
    _require_mixed_dtype_addmm(torch.zeros(2), "fp32")  # accepted
    with pytest.raises(RuntimeError, match=r"^gradient-accumulation fusion of a torch.bfloat16 bias into a "
                                           r"torch.bfloat16 main_grad .*--no-gradient-accumulation-fusion$"):
        _require_mixed_dtype_addmm(torch.zeros(2, dtype=torch.bfloat16), "a torch.bfloat16 bias")

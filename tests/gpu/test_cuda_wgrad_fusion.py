"""Gradient-accumulation fusion on CUDA: the bf16/fp16 x bf16/fp16 -> fp32 wgrad GEMM
accumulates in place (beta = 1) and is more exact than the unfused bf16 GEMM + add; the fused
embedding lookup's row sums are deterministic and exact to fp32, and a bias's column sums go
into its fp32 main_grad in place, as do the Triton norms' gamma and beta; a bf16 model's main
grads (untied Llama, and GPT whose tied head and lookup both fuse) match the unfused path to
bf16 resolution; and `pretrain_gpt.py` at TP=2 with sequence parallelism prints the same curve
with and without the fusion."""
import pytest
import torch

import megatron_lite.fused.norm_grads as norm_grads
import megatron_lite.fused.wgrad as wgrad
import megatron_lite.tensor_parallel.layers as layers
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.tensor_parallel.embedding import _LookupIntoMainGrad
from tests.functional.test_checkpoint_cli import _rows
from tests.functional.test_pretrain_cli import torchrun
from tests.gpu.test_cuda_checkpoint import CUDA_GPT
from tests.model_utils import build, tiny_batch, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_dtype_wgrad_accumulates_in_place_in_fp32(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, out, inp = 8192, 1024, 768
    grad_out = torch.randn(tokens, out, device="cuda", generator=g).to(dtype)
    x = torch.randn(tokens, inp, device="cuda", generator=g).to(dtype)
    start = torch.randn(out, inp, device="cuda", generator=g)
    fused, unfused = start.clone(), start.clone()
    ptr = fused.data_ptr()
    for _ in range(2):  # twice: beta = 1 really accumulates
        wgrad.accumulate_wgrad_(fused, grad_out, x)
        wgrad.reference(unfused, grad_out, x)
    exact = start.double() + 2 * (grad_out.double().t() @ x.double())
    assert fused.data_ptr() == ptr and fused.dtype == torch.float32
    scale = exact.abs().max().item()  # ~1e3: sums of 2 x 8192 products of N(0, 1) values
    fused_err = (fused.double() - exact).abs().max().item() / scale
    unfused_err = (unfused.double() - exact).abs().max().item() / scale
    # fp32 accumulation of exact bf16/fp16 products: ~1e-5 of the scale (measured 1.0e-5 bf16,
    # 1.2e-5 fp16 on H200: cuBLAS's fp32 reduction order); the unfused GEMM rounds its
    # [out, in] result to bf16/fp16 before the add (~1e-3 bf16, ~1e-4 fp16).
    assert fused_err < 5e-5, fused_err
    assert fused_err < unfused_err / 4, (fused_err, unfused_err)


@pytest.mark.parametrize("out", [2048, 6144])
def test_bias_grad_accumulates_in_place_in_fp32(out):
    g = torch.Generator(device="cuda").manual_seed(0)
    grad_out = torch.randn(8192, out, device="cuda", generator=g).to(torch.bfloat16)
    start = torch.randn(out, device="cuda", generator=g)
    fused = start.clone()
    ptr = fused.data_ptr()
    for _ in range(2):  # twice: C = main_grad really accumulates
        wgrad.accumulate_bgrad_(fused, grad_out)
    exact = start.double() + 2 * grad_out.double().sum(0)
    assert fused.data_ptr() == ptr
    # fp32 sums of 8192 exact bf16 values: ~1e-6 of the scale, where a bf16 result is ~4e-3
    err = ((fused.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 1e-5, err


def test_fused_lookup_sums_rows_deterministically_in_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab, hidden = 64, 512
    ids = torch.randint(0, vocab, (8, 1024), device="cuda", generator=g)  # ~128 repeats per row
    grad = torch.randn(8, 1024, hidden, device="cuda", generator=g).to(torch.bfloat16)
    sums = []
    for _ in range(2):
        table = torch.nn.Parameter(torch.randn(vocab, hidden, device="cuda", generator=g).to(torch.bfloat16))
        table.main_grad = torch.zeros(vocab, hidden, device="cuda")
        table.grad_added_to_main_grad = False
        out = _LookupIntoMainGrad.apply(ids, table)
        out.backward(grad)
        assert table.grad_added_to_main_grad
        sums.append(table.main_grad)
    assert torch.equal(sums[0], sums[1])  # same bits: rows summed in a fixed order
    exact = torch.zeros(vocab, hidden, dtype=torch.float64, device="cuda")
    exact.index_add_(0, ids.reshape(-1), grad.reshape(-1, hidden).double())
    torch.testing.assert_close(sums[0].double(), exact, rtol=1e-5, atol=1e-4)


def _bf16_step(fused: bool, family: str = "llama"):
    ps = ParallelState.create()
    cfg = tiny_config(family, params_dtype=torch.bfloat16, gradient_accumulation_fusion=fused,
                      hidden_size=256, num_attention_heads=8, ffn_hidden_size=512, vocab_size=512,
                      max_position_embeddings=256)
    model = build(cfg, ps, device="cuda")
    ddp = DistributedDataParallel(model, ps, DDPConfig(overlap_grad_reduce=True))
    losses = []
    for i in range(3):  # three micro-batches accumulate into main_grad
        tokens, labels = (t.cuda() for t in tiny_batch(cfg, batch=2, seq=128, seed=i))
        ddp.enable_grad_sync(i == 2)
        loss = model(tokens, labels=labels).float().mean()
        loss.backward()
        losses.append(loss.detach())
    ddp.finish_grad_sync()
    return torch.stack(losses), {n: p.main_grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt"], ids=["untied", "tied"])
def test_bf16_model_main_grads_match_the_unfused_path(monkeypatch, family):
    seen = []
    real = layers.accumulate_wgrad_

    def counting(main_grad, g, x):
        seen.append((main_grad.dtype, x.dtype))
        real(main_grad, g, x)

    real_sum, into_main_grad = norm_grads.sum_partials, []

    def counting_norm(partial, like, param):
        into_main_grad.append(param is not None)
        return real_sum(partial, like, param)

    unfused_losses, unfused = _bf16_step(False, family)
    monkeypatch.setattr(layers, "accumulate_wgrad_", counting)
    monkeypatch.setattr(norm_grads, "sum_partials", counting_norm)
    fused_losses, fused = _bf16_step(True, family)
    # The Triton norms' gamma (and GPT's beta) row sums, into main_grad: 2 layers x 2 norms +
    # the final norm, per micro-batch.
    assert into_main_grad == [True] * (3 * 5 * (2 if family == "gpt" else 1)), into_main_grad
    # 2 layers x (qkv, proj, fc1, fc2) + the output layer (untied, or the tied table), per
    # micro-batch; each a bf16 x bf16 -> fp32 GEMM (aten::addmm.dtype_out) into main_grad.
    assert seen == [(torch.float32, torch.bfloat16)] * (3 * 9), seen
    torch.testing.assert_close(fused_losses, unfused_losses, rtol=0, atol=0)
    for name, g in fused.items():
        scale = unfused[name].abs().max().clamp(min=1e-6)
        err = ((g - unfused[name]).abs().max() / scale).item()
        assert err < 2e-2, (name, err)  # bf16 resolution of the unfused per-micro-batch grads


def test_tp2_sequence_parallel_curve_is_unchanged_by_the_fusion():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    fused = _rows(torchrun(2, "pretrain_gpt.py", *CUDA_GPT, *layout).stdout)
    off = "--no-gradient-accumulation-fusion"
    unfused = _rows(torchrun(2, "pretrain_gpt.py", *CUDA_GPT, *layout, off).stdout)
    assert sorted(fused) == sorted(unfused) == list(range(1, 9))
    for it in fused:
        (lr_a, loss_a, _), (lr_b, loss_b, _) = fused[it], unfused[it]
        assert lr_a == lr_b
        assert abs(float(loss_a) - float(loss_b)) <= 2e-2 * float(loss_b), (it, loss_a, loss_b)

"""The sequence-chunked output layer + loss on CUDA in bf16, fused and unfused cross-entropy:
same loss and gradients as the whole path, and a peak memory far below its logits."""
import pytest
import torch

from megatron_lite.fused.cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_lite.models.output_loss import ChunkLimits, OutputHead, output_loss
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.ce_utils import losses_and_grads_against_spec

pytestmark = pytest.mark.gpu


def _run(x, weight, labels, cross_entropy, limits):
    """(loss [b, s], grad x, grad weight, peak bytes above the inputs) of one fwd + bwd."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = output_loss(x, labels, OutputHead(weight, None, None, False), cross_entropy, 0.1, limits)
    loss.mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return loss.detach(), x.grad, weight.grad, peak


def _rel_err(a, ref):
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_bf16_matches_whole_in_a_fraction_of_the_memory(fused):
    torch.manual_seed(0)
    s, b, h, v = 16384, 1, 1024, 32768  # 2**29 logits: 1 GB of bf16
    x = torch.randn(s, b, h, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, v, (b, s), device="cuda")
    ce = fused_vocab_parallel_cross_entropy if fused else vocab_parallel_cross_entropy
    whole = _run(x, weight, labels, ce, ChunkLimits())
    chunked = _run(x, weight, labels, ce, ChunkLimits(whole_max_elements=0, chunk_max_elements=2**24))
    ref = _run(x.float(), weight.float(), labels, vocab_parallel_cross_entropy, ChunkLimits())
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=2e-2)
    for i, what in ((1, "input grad"), (2, "weight grad")):
        # Norm-relative: a per-element check is meaningless where bf16 gradients cancel to ~0.
        err_whole, err_chunked = (_rel_err(r[i], ref[i]) for r in (whole, chunked))
        print(f"{what} vs fp32: whole {err_whole:.2e}, chunked {err_chunked:.2e}")
        # The chunked weight gradient is 32 partial GEMMs summed in bf16 (one GEMM when whole).
        assert err_chunked < max(2 * err_whole, 1e-2), (what, err_whole, err_chunked)
    logits_bytes = s * b * v * 2
    assert whole[3] > logits_bytes, whole[3]
    print(f"peak above inputs: whole {whole[3] / 2**20:.0f} MiB, chunked {chunked[3] / 2**20:.0f} MiB")
    # 32 chunks: one chunk's logits, softmax and gradient, the weight gradient and the
    # [s, b, h] input gradient; the whole path holds several logits-sized buffers.
    assert chunked[3] < logits_bytes / 4, (chunked[3], whole[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_log_softmax_cross_entropy_equals_the_spec_algorithm(dtype, smoothing):
    # GPT 1.3B's padded vocabulary, 4k tokens: ATen's CUDA log-softmax against spec §11's passes.
    torch.manual_seed(0)
    dev = "cuda"
    logits = (torch.randn(2048, 2, 50304, device=dev) * 3).to(dtype)
    target = torch.randint(0, 50304, (2048, 2), device=dev)
    grad = torch.rand(2048, 2, device=dev)
    loss, spec_loss, ours, spec = losses_and_grads_against_spec(logits, target, None, smoothing, grad)
    torch.testing.assert_close(loss, spec_loss, rtol=1e-6, atol=1e-5)
    assert ours.dtype == dtype
    # fp32: 2e8 gradients from two algorithms, a few differ by ~1e-5 relative
    tol = dict(rtol=5e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-7)
    torch.testing.assert_close(ours.float(), spec.float(), **tol)

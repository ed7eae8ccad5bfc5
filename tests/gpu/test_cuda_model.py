"""CUDA paths of the model: SDPA (flash/cuDNN) against the explicit reference attention in
bf16, and the flash path's memory staying far below an `[s, s]` score matrix."""
import pytest
import torch

from megatron_lite.models.attention import core_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["auto", "flash", "fused"])
def test_sdpa_matches_reference_attention_bf16(backend):
    torch.manual_seed(0)
    s, b, n, g, d = 256, 2, 8, 2, 64
    q = torch.randn(s, b, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(s, b, g, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(s, b, g, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = core_attention(q, k, v, backend=backend, dropout_p=0.0, softmax_in_fp32=True)
    ref = core_attention(q.float(), k.float(), v.float(), backend="unfused", dropout_p=0.0,
                         softmax_in_fp32=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    gq, gk, gv = torch.autograd.grad(out.float(), (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    for a, r in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a.float(), r.float(), rtol=5e-2, atol=5e-2)


def test_flash_path_never_materializes_scores():
    s, b, n, d = 8192, 1, 16, 64
    q = torch.randn(s, b, n, d, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    core_attention(q, q[:, :, :4], q[:, :, :4], backend="auto", dropout_p=0.0, softmax_in_fp32=False)
    extra = torch.cuda.max_memory_allocated() - before
    scores_bytes = b * n * s * s * 2
    assert extra < scores_bytes / 20, (extra, scores_bytes)

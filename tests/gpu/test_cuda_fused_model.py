"""A whole model on CUDA with its fused kernels (Triton SwiGLU, RMSNorm and LayerNorm, the
latter two also taking the residual adds and gradients of the layers, compiled RoPE on q as a view of
the fused QKV output) against the same model with every fusion off
(`--no-bias-swiglu-fusion --no-rope-fusion --no-persist-layer-norm`), in fp32: the same loss
and every gradient, for GPT (LayerNorm, biases) and Llama (RMSNorm, SwiGLU, RoPE, GQA)."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from tests.model_utils import build, tiny_batch, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _loss_and_grads(family: str, fused: bool):
    ps = ParallelState.create()
    cfg = tiny_config(family, hidden_size=256, num_attention_heads=8, max_position_embeddings=128,
                      **({"num_query_groups": 2, "ffn_hidden_size": 512} if family == "llama" else {}),
                      bias_swiglu_fusion=fused, apply_rope_fusion=fused, no_persist_layer_norm=not fused)
    model = build(cfg, ps, device="cuda")
    tokens, labels = (t.cuda() for t in tiny_batch(cfg, batch=2, seq=128))
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_fused_kernels_match_the_unfused_model_in_fp32(family):
    loss, grads = _loss_and_grads(family, True)
    ref_loss, ref_grads = _loss_and_grads(family, False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")

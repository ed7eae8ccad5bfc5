"""Single-process model checks: recomputation replays dropout exactly, RoPE and norms match
their textbook formulas, init is deterministic."""
import math

import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.norms import Norm
from megatron_lite.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin
from tests.model_utils import build, tiny_batch, tiny_config


def _grads_with(cfg, seed=7):
    ps = ParallelState.create()
    model = build(cfg, ps, seed=seed)
    model.train()
    tokens, labels = tiny_batch(cfg)
    torch.manual_seed(99)
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="selective"),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_recompute_gives_identical_grads_with_dropout(family, recompute):
    base = tiny_config(family, attention_dropout=0.2, hidden_dropout=0.2)
    ref_loss, ref = _grads_with(base)
    loss, grads = _grads_with(base.replace(**recompute))
    assert torch.equal(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=1e-6, msg=name)


def test_dropout_changes_the_loss():
    # Guards the test above: dropout must actually be active, else it proves nothing.
    base = tiny_config("gpt", attention_dropout=0.2, hidden_dropout=0.2)
    no_drop = tiny_config("gpt")
    assert not torch.equal(_grads_with(base)[0], _grads_with(no_drop)[0])


def test_same_seed_same_weights_different_seed_different():
    ps = ParallelState.create()
    cfg = tiny_config("llama")
    a, b, c = build(cfg, ps, seed=1), build(cfg, ps, seed=1), build(cfg, ps, seed=2)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), n
        if "layernorm" not in n:
            assert not torch.equal(pa, pc), n


def test_scaled_init_of_output_projections():
    ps = ParallelState.create()
    cfg = tiny_config("gpt", num_layers=8, hidden_size=256, num_attention_heads=4)
    model = build(cfg, ps)
    proj = model.decoder.layers[0].self_attention.linear_proj.weight
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.0005


def test_embedding_init_method_std():
    ps = ParallelState.create()
    cfg = tiny_config("gpt", hidden_size=256, num_attention_heads=4, embedding_init_method_std=0.1)
    model = build(cfg, ps)
    assert abs(model.embedding.word_embeddings.weight.std().item() - 0.1) < 0.005
    assert abs(model.embedding.position_embeddings.weight.std().item() - 0.1) < 0.01
    assert abs(model.decoder.layers[0].self_attention.linear_qkv.weight.std().item() - 0.02) < 0.002


def test_rope_rotates_pairs_of_halves():
    d = 8
    inv = inverse_frequencies(d, 10000.0)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    pos = torch.tensor([[3]])
    cos, sin = rotary_cos_sin(pos, inv)  # [1, 1, 1, d]
    x = torch.arange(1.0, d + 1).view(1, 1, 1, d)
    out = apply_rotary(x, cos, sin)
    for i in range(d // 2):
        a, b, th = x[..., i], x[..., i + d // 2], 3 * inv[i]
        torch.testing.assert_close(out[..., i], a * math.cos(th) - b * math.sin(th))
        torch.testing.assert_close(out[..., i + d // 2], b * math.cos(th) + a * math.sin(th))


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    plain = inverse_frequencies(128, 500000.0)
    scaled = inverse_frequencies(128, 500000.0, use_llama3_scaling=True, scaling_factor=8.0)
    assert torch.equal(scaled[:10], plain[:10])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-5:], plain[-5:] / 8.0)  # long wavelengths / factor


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_norms(kind):
    x = torch.randn(3, 2, 16)
    norm = Norm(16, kind, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_()
    if kind == "LayerNorm":
        ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        ref = ref * norm.weight + norm.bias
    else:
        ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    one_p = Norm(16, kind, zero_centered=True)
    assert torch.equal(one_p.weight, torch.zeros(16))
    torch.testing.assert_close(one_p(x), Norm(16, kind)(x))

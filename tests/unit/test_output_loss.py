"""The sequence-chunked output layer + cross-entropy equals the whole one (per-token loss and
every gradient), really runs in chunks with recompute, and keeps the module's pre-hooks."""
import pytest
import torch

import megatron_lite.models.gpt as gpt_module
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.init import init_model_parameters
from megatron_lite.models.output_loss import ChunkLimits, sequence_chunk_length
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.model_utils import build, tiny_batch, tiny_config

# tiny_batch: b=2, s=16; tiny_config: V=128, so one position is 256 logits. At most 3 positions
# per chunk -> 6 chunks of ceil(16/6) = 3 positions, the last one 1 (an uneven split on purpose).
FORCE_CHUNKS = ChunkLimits(whole_max_elements=0, chunk_max_elements=3 * 256)


def test_policy():
    assert sequence_chunk_length(16, 2, 128) is None  # far below 2**30
    assert sequence_chunk_length(2**14, 2, 2**15) is None  # exactly 2**30: still whole
    # 128K tokens x 128K vocab = 2**34 logits -> 64 chunks of 2**28 (2048 positions each).
    assert sequence_chunk_length(2**17, 1, 2**17) == 2**11
    # 40000 x 2**15 > 2**30: at most 8192 positions per chunk -> 5 chunks of 8000.
    assert sequence_chunk_length(40000, 1, 2**15) == 8000
    # One position alone above the chunk limit still makes a chunk of one.
    assert sequence_chunk_length(4, 2, 128, ChunkLimits(0, 100)) == 1
    assert sequence_chunk_length(16, 2, 128, FORCE_CHUNKS) == 3


def _loss_and_grads(model, tokens, labels, limits, hidden=None):
    model.zero_grad(set_to_none=True)
    model.loss_chunk_limits = limits
    if hidden is not None:
        hidden = hidden.detach().requires_grad_()
        loss = model(labels=labels, hidden_states=hidden)
    else:
        loss = model(tokens, labels=labels)  # [b, s]
    # A mean, as in training (so gradients are O(1) and 1e-6 is a few fp32 ulps), but with
    # non-uniform token weights, so a mis-ordered chunk would show in the gradients.
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss) / loss.numel()
    (loss * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if hidden is not None:
        grads["<hidden_states>"] = hidden.grad.clone()
    return loss.detach(), grads


def _assert_same(whole, chunked):
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-6)
    assert chunked[1].keys() == whole[1].keys()
    for name, g in whole[1].items():
        assert chunked[1][name] is not None, name
        torch.testing.assert_close(chunked[1][name], g, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family,overrides", [
    ("gpt", {}),  # tied head through the embedding weight
    ("gpt", {"label_smoothing": 0.1}),
    ("gpt", {"untie_embeddings_and_output_weights": True, "label_smoothing": 0.2}),
    ("llama", {}),  # untied head through the output layer module
    ("llama", {"label_smoothing": 0.1}),
])
def test_chunked_equals_whole(family, overrides):
    cfg = tiny_config(family, **overrides)
    model = build(cfg, ParallelState.create())
    tokens, labels = tiny_batch(cfg)
    whole = _loss_and_grads(model, tokens, labels, ChunkLimits())
    _assert_same(whole, _loss_and_grads(model, tokens, labels, FORCE_CHUNKS))


def test_last_stage_tied_copy_chunked_equals_whole():
    # A last pipeline stage: hidden states in, the tied embedding's copy as an output layer.
    cfg = tiny_config("gpt", label_smoothing=0.1)
    model = GPTModel(cfg, ParallelState.create(), pre_process=False, post_process=True)
    init_model_parameters(model, 5, cfg.init_method_std, cfg.num_layers, 0, 1)
    _, labels = tiny_batch(cfg)
    hidden = torch.randn(labels.shape[1], labels.shape[0], cfg.hidden_size)  # [s, b, h]
    whole = _loss_and_grads(model, None, labels, ChunkLimits(), hidden)
    _assert_same(whole, _loss_and_grads(model, None, labels, FORCE_CHUNKS, hidden))


def test_chunked_really_chunks_and_recomputes(monkeypatch):
    """Each loss call sees one chunk's logits; backward recomputes them chunk by chunk; the
    forward keeps no full-sequence `[s, b, V]` tensor alive for backward."""
    cfg = tiny_config("llama")
    model = build(cfg, ParallelState.create())
    tokens, labels = tiny_batch(cfg)
    seen = []

    def spy(logits, target, group, label_smoothing):
        seen.append(tuple(logits.shape))
        return vocab_parallel_cross_entropy(logits, target, group, label_smoothing)

    monkeypatch.setattr(gpt_module, "vocab_parallel_cross_entropy", spy)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for limits, calls in [(ChunkLimits(), 1), (FORCE_CHUNKS, 6)]:
        seen.clear(), saved.clear()
        model.loss_chunk_limits = limits
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, labels=labels)
        assert len(seen) == calls
        full_logits = [s for s in saved if s[-1] == cfg.vocab_size and s[0] == 16]
        assert bool(full_logits) == (calls == 1), saved
        loss.sum().backward()
        recomputed = 0 if calls == 1 else calls
        assert len(seen) == calls + recomputed
    assert seen[:6] == [(3, 2, 128)] * 5 + [(1, 2, 128)]


def test_output_layer_pre_hook_fires_before_chunks():
    cfg = tiny_config("llama")
    model = build(cfg, ParallelState.create())
    tokens, labels = tiny_batch(cfg)
    events = []
    model.output_layer.register_forward_pre_hook(lambda m, args: events.append("pre_hook"))
    model.loss_chunk_limits = FORCE_CHUNKS
    model(tokens, labels=labels).sum().backward()
    assert events == ["pre_hook"]


def test_chunked_without_grad_matches():
    cfg = tiny_config("gpt")
    model = build(cfg, ParallelState.create())
    tokens, labels = tiny_batch(cfg)
    with torch.no_grad():
        whole = model(tokens, labels=labels)
        model.loss_chunk_limits = FORCE_CHUNKS
        chunked = model(tokens, labels=labels)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)

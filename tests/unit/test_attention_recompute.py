"""Rematerialization-aware full recompute (context_parallel/core.py): a checkpointed layer keeps
its attention output and LSE, so the recompute in backward never attends again, and the
gradients equal those of the run without recompute."""
import pytest
import torch

from megatron_lite.context_parallel import kernels
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models import attention
from tests.model_utils import build, tiny_batch, tiny_config

FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _step(cfg, monkeypatch, calls):
    real_block, real_sdpa = kernels.BlockKernel.forward, attention.core_attention

    def block(self, *a, **kw):
        calls["block"] += 1
        return real_block(self, *a, **kw)

    def sdpa(*a, **kw):
        calls["sdpa"] += 1
        return real_sdpa(*a, **kw)

    monkeypatch.setattr(kernels.BlockKernel, "forward", block)
    monkeypatch.setattr(attention, "core_attention", sdpa)
    model = build(cfg, ParallelState.create())
    model.train()
    tokens, labels = tiny_batch(cfg)
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("method", ["uniform", "block"])
def test_full_recompute_attends_once_per_layer(family, method, monkeypatch):
    base = tiny_config(family, num_layers=3)
    ref_calls = {"block": 0, "sdpa": 0}
    ref_loss, ref = _step(base, monkeypatch, ref_calls)
    assert ref_calls == {"block": 0, "sdpa": 3}
    calls = {"block": 0, "sdpa": 0}
    cfg = base.replace(**{**FULL, "recompute_method": method, "recompute_num_layers": 2})
    loss, grads = _step(cfg, monkeypatch, calls)
    kept = 3 if method == "uniform" else 2  # block: only the first 2 layers are checkpointed
    assert calls == {"block": kept, "sdpa": 3 - kept}, calls
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_without_keeping_the_recompute_attends_again(monkeypatch):
    calls = {"block": 0, "sdpa": 0}
    _step(tiny_config("llama", num_layers=2, **FULL, recompute_keeps_attention=False), monkeypatch, calls)
    assert calls == {"block": 0, "sdpa": 4}  # forward and recompute of each layer


def test_stash_is_empty_after_backward(monkeypatch):
    cfg = tiny_config("gpt", num_layers=2, **FULL)
    model = build(cfg, ParallelState.create())
    tokens, labels = tiny_batch(cfg)
    losses = [model(tokens, labels=labels).mean() for _ in range(3)]  # three micro-batches in flight
    stashes = [layer.self_attention.stash for layer in model.decoder.layers]
    assert [len(s) for s in stashes] == [3, 3]
    for loss in losses:
        loss.backward()
    assert [len(s) for s in stashes] == [0, 0]

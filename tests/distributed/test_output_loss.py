"""Under TP = 2, with and without sequence parallelism, the sequence-chunked output layer +
cross-entropy gives the whole path's per-token loss and every local gradient on every rank
(the whole path itself is checked against the dense model in test_model_parity)."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.output_loss import ChunkLimits
from tests.model_utils import build, tiny_batch, tiny_config

# V/tp = 64 and b = 2: 128 logits per position, so chunks of 3 positions (3,3,3,3,3,1 over
# s = 16), which straddle the sequence-parallel shard boundary at position 8.
FORCE_CHUNKS = ChunkLimits(whole_max_elements=0, chunk_max_elements=3 * 128)


def _loss_and_grads(model, tokens, labels, limits):
    model.zero_grad(set_to_none=True)
    model.loss_chunk_limits = limits
    loss = model(tokens, labels=labels)  # [b, s]
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss) / loss.numel()
    (loss * weights).sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _whole_and_chunked(rank, world, family, sp, overrides):
    ps = ParallelState.create(tp=world)
    try:
        cfg = tiny_config(family, sequence_parallel=sp, **overrides)
        model = build(cfg, ps)
        tokens, labels = tiny_batch(cfg)
        return (_loss_and_grads(model, tokens, labels, ChunkLimits()),
                _loss_and_grads(model, tokens, labels, FORCE_CHUNKS))
    finally:
        ps.destroy()


@pytest.mark.parametrize("family,overrides", [
    ("gpt", {"label_smoothing": 0.1}),  # tied head through the embedding weight
    ("llama", {"label_smoothing": 0.1}),  # untied head through the output layer module
])
@pytest.mark.parametrize("sp", [False, True])
def test_chunked_equals_whole_tp2(run_dist, family, overrides, sp):
    for rank, (whole, chunked) in enumerate(run_dist(2, _whole_and_chunked, family, sp, overrides)):
        torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-6, msg=f"loss rank {rank}")
        assert chunked[1].keys() == whole[1].keys()
        for name, g in whole[1].items():
            torch.testing.assert_close(chunked[1][name], g, rtol=0, atol=1e-6,
                                       msg=f"grad {name} rank {rank}")

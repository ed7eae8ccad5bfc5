"""Context-parallel attention (ring, all-gather, Ulysses, hierarchical) equals dense causal
attention on the full sequence: outputs and the gradients of q, k and v, on gloo."""
import pytest
import torch

from megatron_lite.context_parallel import ContextParallelAttention
from megatron_lite.context_parallel.split import gather_sequence, split_sequence
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.attention import core_attention

S, B, D = 16, 2, 8


def _inputs(heads, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, heads, D, generator=g, dtype=torch.float64)
    k = torch.randn(S, B, groups, D, generator=g, dtype=torch.float64)
    v = torch.randn(S, B, groups, D, generator=g, dtype=torch.float64)
    dout = torch.randn(S, B, heads * D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _local(q, k, v):
    return core_attention(q, k, v, backend="unfused", dropout_p=0.0, softmax_in_fp32=False)


def _dense(heads, groups):
    q, k, v, dout = _inputs(heads, groups)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    out = _local(q, k, v)
    out.backward(dout.float())
    return out.detach(), q.grad, k.grad, v.grad


def _cp_run(rank, world, comm_type, heads, groups, hierarchical):
    ps = ParallelState.create(cp=world, hierarchical_cp=hierarchical)
    try:
        inner = ps.cp_comm("cp-inner") if hierarchical else None
        outer = ps.cp_comm("cp-outer") if hierarchical else None
        attn = ContextParallelAttention(comm_type, ps.cp_comm(), "auto", inner, outer)
        q, k, v, dout = (split_sequence(t, world, ps.cp_rank, dim=0).float() for t in _inputs(heads, groups))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = attn(q, k, v, _local)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad
    finally:
        ps.destroy()


CASES = [("p2p", 2, None), ("p2p", 4, None), ("all_gather", 2, None), ("all_gather", 4, None),
         ("a2a", 2, None), ("a2a", 4, None), ("a2a+p2p", 4, (2, 2))]


@pytest.mark.parametrize("comm_type,cp,hierarchical", CASES)
@pytest.mark.parametrize("heads,groups", [(8, 8), (8, 2)])
def test_cp_attention_matches_dense(run_dist, comm_type, cp, hierarchical, heads, groups):
    ref = _dense(heads, groups)
    results = run_dist(cp, _cp_run, comm_type, heads, groups, hierarchical)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        full = gather_sequence([r[i] for r in results], dim=0)
        torch.testing.assert_close(full, ref[i], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

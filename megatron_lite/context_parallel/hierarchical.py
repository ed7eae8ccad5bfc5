"""Hierarchical context parallelism (`--cp-comm-type a2a+p2p` with
`--hierarchical-context-parallel-sizes a b`, spec §9.2): an all-to-all inside groups of `a`
consecutive CP ranks (NVLink), then ring attention across the `b` such groups (the network).

Inner group k holds the small zig-zag chunks k·a ... k·a+a-1 and their mirrors, which are
exactly the big chunks k and 2b-1-k of a zig-zag split into 2b chunks. After the inner
all-to-all (ulysses.py, reordered into zig-zag halves) every rank therefore holds the zig-zag
share of outer rank k for its head slice, and the ring of ring.py applies unchanged.
"""
from __future__ import annotations

import torch

from megatron_lite.context_parallel.comm import CPComm
from megatron_lite.context_parallel.core import AttentionStash, core_attention_bhsd, ring_core
from megatron_lite.context_parallel.kernels import BlockKernel
from megatron_lite.context_parallel.ulysses import gather_heads, scatter_heads


def hierarchical_attention(q, k, v, inner: CPComm, outer: CPComm, kernel: BlockKernel,
                           stash: AttentionStash | None = None) -> torch.Tensor:
    """q `[s/cp, b, np, d]`, k/v `[s/cp, b, ng, d]` -> `[s/cp, b, np*d]`."""
    s_l, b, heads, d = q.shape
    qf, kf, vf = scatter_heads(q, k, v, inner, "--cp-comm-type a2a+p2p")  # [s/b, b, np/a or ng', d]
    qf, kf, vf = (t.permute(1, 2, 0, 3) for t in (qf, kf, vf))  # [b, heads, s/b, d]
    ctx = core_attention_bhsd(qf, kf, vf, ring_core(outer, kernel), stash)  # [b, np/a, s/b, d]
    return gather_heads(ctx.permute(2, 0, 1, 3), inner).reshape(s_l, b, heads * d)

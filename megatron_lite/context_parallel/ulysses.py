"""Ulysses attention (`--cp-comm-type a2a`, DeepSpeed-Ulysses, Jacobs et al. 2023; spec §9.2):
an all-to-all turns sequence-sharded Q/K/V into head-sharded full-sequence Q/K/V, each rank
runs ordinary causal attention on its heads, and a second all-to-all turns the output back.

Q, K and V travel in one all-to-all. With GQA each rank needs whole K/V heads for its query
heads: K/V heads split over the group when their count divides by it, and are replicated
(each serving several ranks) when the group size divides by their count; otherwise the
layout is refused. The gathered sequence arrives in group order (member t: chunks t and
2n-1-t); `to_zigzag_halves` reorders it so that hierarchical CP can run a ring on top.
"""
from __future__ import annotations

import torch

from megatron_lite.context_parallel.comm import CPComm, heads_to_seq_autograd, seq_to_heads_autograd


def check_heads(num_heads: int, num_groups: int, size: int, what: str) -> None:
    """Raise a ValueError naming the flags when `size` ranks cannot share the heads.
    `num_heads`, `num_groups`: this TP rank's query heads and K/V heads."""
    if num_heads % size:
        raise ValueError(f"{what} needs --num-attention-heads / --tensor-model-parallel-size ({num_heads}) "
                         f"divisible by its all-to-all size ({size})")
    if num_groups % size and size % num_groups:
        raise ValueError(f"{what} needs --num-query-groups / --tensor-model-parallel-size ({num_groups}) to "
                         f"divide or be divisible by its all-to-all size ({size})")


def to_zigzag_halves(x: torch.Tensor) -> torch.Tensor:
    """`[n, 2c, ...]` (member t's local halves: chunks t, 2n-1-t) -> `[2nc, ...]`: the first
    halves in member order, then the second halves in reverse member order; for n members
    holding a whole sequence that is the natural order."""
    n, two_c = x.shape[:2]
    c = two_c // 2
    first = x[:, :c].reshape(n * c, *x.shape[2:])
    second = x.flip(0)[:, c:].reshape(n * c, *x.shape[2:])
    return torch.cat([first, second])


def from_zigzag_halves(y: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `to_zigzag_halves`: `[2nc, ...]` -> `[n, 2c, ...]`."""
    first, second = y.chunk(2)
    rest = y.shape[1:]
    first = first.reshape(n, -1, *rest)
    second = second.reshape(n, -1, *rest).flip(0)
    return torch.cat([first, second], dim=1)


def scatter_heads(q, k, v, comm: CPComm, what: str = "--cp-comm-type a2a"):
    """q `[s_l, b, np, d]`, k/v `[s_l, b, ng, d]` -> q `[n*s_l, b, np/n, d]`, k/v
    `[n*s_l, b, max(ng/n, 1), d]` over the group's whole sequence (zig-zag halves order)."""
    n = comm.size
    s_l, b, heads, d = q.shape
    groups = k.shape[2]
    check_heads(heads, groups, n, what)
    if groups % n:  # fewer K/V heads than ranks: replicate, each copy serves n/ng ranks
        k, v = (t.repeat_interleave(n // groups, dim=2) for t in (k, v))
    hq, hk = heads // n, k.shape[2] // n
    parts = [t.reshape(s_l, b, n, -1, d) for t in (q, k, v)]  # [s_l, b, n, H/n, d]
    packed = torch.cat(parts, dim=3).reshape(s_l, b, -1, d)  # [s_l, b, n*(hq+2hk), d]
    full = to_zigzag_halves(seq_to_heads_autograd(packed, comm))  # [n*s_l, b, hq+2hk, d]
    return full.split([hq, hk, hk], dim=2)


def gather_heads(ctx: torch.Tensor, comm: CPComm) -> torch.Tensor:
    """`[n*s_l, b, np/n, d]` (zig-zag halves order) -> `[s_l, b, np, d]`."""
    return heads_to_seq_autograd(from_zigzag_halves(ctx, comm.size).contiguous(), comm)


def ulysses_attention(q, k, v, comm: CPComm, local_attention) -> torch.Tensor:
    """q `[s/cp, b, np, d]`, k/v `[s/cp, b, ng, d]` -> `[s/cp, b, np*d]`. `local_attention`:
    the model's causal core attention, `[s, b, h, d]` x3 -> `[s, b, h*d]`."""
    s_l, b, heads, d = q.shape
    qf, kf, vf = scatter_heads(q, k, v, comm)
    ctx = local_attention(qf, kf, vf).view(qf.shape)  # [s, b, np/cp, d]
    return gather_heads(ctx, comm).reshape(s_l, b, heads * d)

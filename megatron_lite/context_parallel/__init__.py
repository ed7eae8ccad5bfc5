"""Context parallelism (spec §9): the sequence of every micro-batch is split over the CP ranks
(split.py) and attention, the one layer that mixes positions, communicates across them with
one of four algorithms chosen per layer by `--cp-comm-type`. Everything else in the model
is position-wise and runs on the local tokens unchanged.

`ContextParallelAttention` is the per-layer entry: it takes the model's q/k/v in
`[s/cp, b, heads, d]` and returns `[s/cp, b, np*d]`, like `models.attention.core_attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lite.context_parallel.comm import CPComm
from megatron_lite.context_parallel.core import (
    AttentionStash,
    LocalCore,
    allgather_core,
    core_attention_bhsd,
    ring_core,
)
from megatron_lite.context_parallel.hierarchical import hierarchical_attention
from megatron_lite.context_parallel.kernels import BlockKernel, select_backend
from megatron_lite.context_parallel.ulysses import ulysses_attention

COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")


def block_kernel(attention_backend: str, q: torch.Tensor, dropout_p: float = 0.0) -> BlockKernel:
    """The block kernel for q `[.., d]` on its device and dtype (kernels.py)."""
    return BlockKernel(select_backend(attention_backend, q.device, q.dtype), 1.0 / math.sqrt(q.shape[-1]),
                       dropout_p)


def stashed_local_attention(attention_backend: str, dropout_p: float, stash: AttentionStash):
    """Causal attention `[s, b, heads, d]` x3 -> `[s, b, np*d]` as one LSE block, whose output
    a recomputed layer takes from `stash` instead of attending again (core.py)."""

    def attend(q, k, v):
        s, b, heads, d = q.shape
        core = LocalCore(block_kernel(attention_backend, q, dropout_p))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        out = core_attention_bhsd(q, k, v, core, stash)  # [b, np, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)

    return attend


@dataclass(frozen=True)
class ContextParallelAttention:
    comm_type: str  # one of COMM_TYPES
    comm: CPComm  # the whole CP group
    attention_backend: str = "auto"  # --attention-backend: picks the block kernel (kernels.py)
    inner: CPComm | None = None  # a2a+p2p: the all-to-all group
    outer: CPComm | None = None  # a2a+p2p: the ring group

    def __post_init__(self):
        if self.comm_type not in COMM_TYPES:
            raise ValueError(f"--cp-comm-type {self.comm_type} is not one of {', '.join(COMM_TYPES)}")
        if self.comm_type == "a2a+p2p" and (self.inner is None or self.outer is None):
            raise ValueError("--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes")

    def __call__(self, q, k, v, local_attention, dropout_p: float = 0.0,
                 stash: AttentionStash | None = None) -> torch.Tensor:
        """q `[s/cp, b, np, d]`, k/v `[s/cp, b, ng, d]` -> `[s/cp, b, np*d]`. `local_attention`:
        the model's own causal attention (with its dropout), used where a rank sees whole
        sequences (a2a); `dropout_p`: attention dropout of the block kernels; `stash`: the
        layer's attention-recompute stash (core.py), None outside full recompute."""
        if self.comm_type == "a2a":
            if stash is not None:
                local_attention = stashed_local_attention(self.attention_backend, dropout_p, stash)
            return ulysses_attention(q, k, v, self.comm, local_attention)
        s_l, b, heads, d = q.shape
        kernel = block_kernel(self.attention_backend, q, dropout_p)
        if self.comm_type == "a2a+p2p":
            return hierarchical_attention(q, k, v, self.inner, self.outer, kernel, stash)
        core = (ring_core if self.comm_type == "p2p" else allgather_core)(self.comm, kernel)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s/cp, d]
        out = core_attention_bhsd(q, k, v, core, stash)  # [b, np, s/cp, d]
        return out.permute(2, 0, 1, 3).reshape(s_l, b, heads * d)

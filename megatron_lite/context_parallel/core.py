"""One autograd function for every attention algorithm that has an explicit forward (returning
the output and its log-sum-exp) and backward (taking them): the local causal block, the ring
and the all-gather. It also lets full-layer activation recompute skip the attention forward.

Rematerialization-aware recompute (LightSeq, Li et al. 2023, §3.3): with
`--recompute-granularity full` a checkpointed layer runs twice, once in forward and again in
backward to rebuild what backward needs. The attention forward is the most expensive part of
that recompute at long sequences (O(s²) work, and with CP a whole ring of transfers), yet its
backward needs only q, k, v (cheap to recompute: norms and the QKV GEMM) plus the output and
LSE. So in the first run the layer keeps its attention output and LSE (`AttentionStash`,
`[s, b, h]` + `[b, np, s]` fp32 per layer, as much as the checkpointed layer input), and the
recompute takes them instead of attending again.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_lite.context_parallel.allgather import allgather_backward, allgather_forward
from megatron_lite.context_parallel.comm import CPComm
from megatron_lite.context_parallel.kernels import BlockKernel
from megatron_lite.context_parallel.ring import ring_backward, ring_forward

OFF, RECORD, REPLAY = "off", "record", "replay"


class AttentionStash:
    """Per-layer FIFO of (out, lse, rng) kept by the first run of a checkpointed layer for its
    recompute. FIFO: a chunk's micro-batches go backward in the order they went forward (every
    schedule of spec §6), so with several micro-batches in flight the oldest entry is next."""

    def __init__(self):
        self.mode = OFF
        self._entries: deque = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, entry) -> None:
        self._entries.append(entry)

    def pop(self):
        if not self._entries:
            raise RuntimeError("attention recompute found no stashed output: a layer was recomputed "
                               "more often than it ran forward")
        return self._entries.popleft()


@contextlib.contextmanager
def stash_mode(stashes: list[AttentionStash], mode: str):
    """Run a block with the given stashes in `mode` (RECORD in a checkpointed forward, REPLAY
    in its recompute), restoring their modes afterwards."""
    before = [s.mode for s in stashes]
    for s in stashes:
        s.mode = mode
    try:
        yield
    finally:
        for s, m in zip(stashes, before):
            s.mode = m


@dataclass(frozen=True)
class LocalCore:
    """Causal attention over the whole (local) sequence as one block."""

    kernel: BlockKernel

    def forward(self, q, k, v):
        out, lse, rng = self.kernel.forward(q, k, v, True)
        return out, lse, rng

    def backward(self, dout, q, k, v, out, lse, rng):
        return self.kernel.backward(dout, q, k, v, out, lse, True, rng)


@dataclass(frozen=True)
class CommCore:
    """Attention across a CP group through a forward/backward pair of functions taking
    (..., comm, kernel): the ring of ring.py or the all-gather of allgather.py."""

    comm: CPComm
    kernel: BlockKernel
    forward_fn: Callable
    backward_fn: Callable

    def forward(self, q, k, v):
        return self.forward_fn(q, k, v, self.comm, self.kernel)

    def backward(self, dout, q, k, v, out, lse, rngs):
        return self.backward_fn(dout, q, k, v, out, lse, rngs, self.comm, self.kernel)


def ring_core(comm: CPComm, kernel: BlockKernel) -> CommCore:
    return CommCore(comm, kernel, ring_forward, ring_backward)


def allgather_core(comm: CPComm, kernel: BlockKernel) -> CommCore:
    return CommCore(comm, kernel, allgather_forward, allgather_backward)


class CoreAttention(torch.autograd.Function):
    """q `[b, np, s, d]`, k/v `[b, ng, s, d]` -> out `[b, np, s, d]` through `core`; saves the
    inputs and the output with its LSE, which is all any core's backward needs."""

    @staticmethod
    def forward(ctx, q, k, v, core, stash: AttentionStash | None):
        mode = stash.mode if stash is not None else OFF
        if mode == REPLAY:
            out, lse, rng = stash.pop()
        else:
            out, lse, rng = core.forward(q, k, v)
            if mode == RECORD:
                stash.push((out, lse, rng))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.core, ctx.rng = core, rng
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.core.backward(dout.contiguous(), q, k, v, out, lse, ctx.rng)
        return dq, dk, dv, None, None


def core_attention_bhsd(q, k, v, core, stash: AttentionStash | None = None) -> torch.Tensor:
    """`CoreAttention` on `[b, heads, s, d]` tensors."""
    return CoreAttention.apply(q, k, v, core, stash)

"""The communication context-parallel attention needs: a ring neighbour exchange and the
Ulysses all-to-all, both on a group `ParallelState` owns (DESIGN rule 11)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Distinct tags for the two streams of ring messages, so that a K/V block and a dK/dV
# accumulator in flight between the same pair can never be matched with each other (gloo
# matches by tag; NCCL matches in issue order, which is the same on every rank).
KV_TAG, DKV_TAG = 11, 12


@dataclass(frozen=True)
class CPComm:
    """One context-parallel group as seen from this rank: the ProcessGroup, its members'
    global ranks in group order, and this rank's index among them."""

    group: object
    ranks: tuple[int, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.index + 1) % self.size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.index - 1) % self.size]


def ring_exchange(comm: CPComm, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
    """Send `send` to the next ring member and receive the previous member's into `recv`,
    asynchronously; returns the works to wait on. Both directions go in one batch: with NCCL
    a ring of separate blocking-order sends would deadlock (every rank sending first)."""
    if comm.size == 1:  # a ring of one (hierarchical CP with one outer group): no transfer
        recv.copy_(send)
        return []
    ops = [dist.P2POp(dist.isend, send, comm.next_rank, comm.group, tag),
           dist.P2POp(dist.irecv, recv, comm.prev_rank, comm.group, tag)]
    return dist.batch_isend_irecv(ops)


def wait_all(works: list) -> None:
    for work in works:
        work.wait()


def all_to_all(x: torch.Tensor, comm: CPComm) -> torch.Tensor:
    """`[n, ...]` with part j (of n/size rows) for member j -> `[n, ...]` with part j from
    member j."""
    if comm.size == 1:  # an all-to-all group of one (hierarchical CP with inner size 1)
        return x
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=comm.group)
    return out


class _Ulysses(torch.autograd.Function):
    """The two all-to-alls of Ulysses, each the other's backward. `to_heads`: sequence-sharded
    `[s_l, b, size*H, d]` -> head-sharded `[size, s_l, b, H, d]`; else the way back."""

    @staticmethod
    def forward(ctx, x, comm, to_heads: bool):
        ctx.comm, ctx.to_heads = comm, to_heads
        return seq_to_heads(x, comm) if to_heads else heads_to_seq(x, comm)

    @staticmethod
    def backward(ctx, grad):
        back = heads_to_seq(grad, ctx.comm) if ctx.to_heads else seq_to_heads(grad, ctx.comm)
        return back, None, None


def seq_to_heads(x: torch.Tensor, comm: CPComm) -> torch.Tensor:
    s_l, b, heads, d = x.shape
    n = comm.size
    parts = x.reshape(s_l, b, n, heads // n, d).permute(2, 0, 1, 3, 4)  # [n, s_l, b, H, d]
    return all_to_all(parts, comm)  # [n, s_l, b, H, d]: part j = member j's tokens


def heads_to_seq(y: torch.Tensor, comm: CPComm) -> torch.Tensor:
    n, s_l, b, heads, d = y.shape
    back = all_to_all(y, comm)  # [n, s_l, b, H, d]: part j = our tokens, member j's heads
    return back.permute(1, 2, 0, 3, 4).reshape(s_l, b, n * heads, d)  # [s_l, b, n*H, d]


def seq_to_heads_autograd(x: torch.Tensor, comm: CPComm) -> torch.Tensor:
    return _Ulysses.apply(x, comm, True)


def heads_to_seq_autograd(y: torch.Tensor, comm: CPComm) -> torch.Tensor:
    return _Ulysses.apply(y, comm, False)

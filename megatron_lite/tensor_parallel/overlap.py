"""`--tp-comm-overlap` without Transformer Engine: the sequence-parallel all-gather before a
column-parallel GEMM and the reduce-scatter after a row-parallel GEMM, decomposed into a ring
of tp point-to-point steps whose transfers run while the GEMM of the previous (or next) chunk
computes (collective matmul; Wang et al. 2023, "Overlap Communication with Dependent
Computation via Decomposition in Large Deep Learning Models"). TE's userbuffers do the same
with copy engines.

Each step sends one `[s/tp, b, .]` sequence chunk to a ring neighbour of the TP group while
a GEMM on another chunk runs; on NCCL the transfers run on the group's communication stream,
on gloo in its threads, so the CPU tests run the very same algorithm. On CUDA, for a TP group
inside one node, the chunks move by the copy engines through symmetric memory instead
(copy_engine.py): each peer's chunk directly (one NVLink hop), without NCCL kernels competing
with the GEMMs for SMs (on 2xH200 the p2p ring gained nothing; the copy engines cut a graphed
GPT 1.3B TP2 step from 731 to 682 ms). Without overlap the collective is exposed: nothing
independent of its result is left to compute.

    column forward   Y[c] = X_c W^T       X_c arrives around the ring (all-gather)
    column backward  dX_r = sum_j G^j_r W^j   partial sums travel the ring (reduce-scatter)
    row forward      Y_r = sum_j X^j_r W^jT   partial sums travel the ring (reduce-scatter)
    row backward     dX[c] = G_c W         G_c arrives around the ring (all-gather)

The column forward keeps the gathered X, which layers.py saves for the weight gradient, so the
column backward does not gather it again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.tensor_parallel import copy_engine
from megatron_lite.tensor_parallel.collectives import group_rank, group_size


class _Ring:
    """The TP group as a ring: this rank's index and its neighbours' global ranks."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, group_size(group), group_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.right, self.left = ranks[(self.rank + 1) % self.size], ranks[(self.rank - 1) % self.size]

    def shift(self, send: torch.Tensor, recv: torch.Tensor, leftwards: bool) -> list:
        """Send `send` to one neighbour and receive the other's into `recv`, asynchronously.
        Both in one batch: with NCCL, blocking sends around a ring would deadlock."""
        to, frm = (self.left, self.right) if leftwards else (self.right, self.left)
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to, self.group),
                                       dist.P2POp(dist.irecv, recv, frm, self.group)])


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _mm_into(out: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out `[c, b, n]` = a `[c, b, k]` @ b_t `[k, n]` (+ bias), written in place (no temporary)."""
    a2d, out2d = a.reshape(-1, a.size(-1)), out.view(-1, out.size(-1))  # [c*b, k], [c*b, n]
    if bias is None:
        torch.mm(a2d, b_t, out=out2d)
    else:
        torch.addmm(bias, a2d, b_t, out=out2d)


def all_gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      group) -> torch.Tensor:
    """Column-parallel forward: `all_gather(x) W^T + b` for x `[s/tp, b, in]`, weight
    `[out/tp, in]` -> `[s, b, out/tp]`, with each chunk's GEMM hiding the next chunk's transfer
    (all_gather_matmul; layers.py also keeps the gathered input it returns)."""
    return all_gather_matmul(x, weight.t(), group, bias)[1]  # [s, b, out/tp]


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group,
                          region: int = copy_engine.FENCED) -> torch.Tensor:
    """Row-parallel forward: `reduce_scatter(x W^T)` for x `[s, b, in/tp]`, weight
    `[out, in/tp]` -> `[s/tp, b, out]` summed over TP, each partial GEMM hiding a transfer.

    The partial sum of sequence chunk c starts on rank c+1 and travels rightwards, each rank
    adding its own part, until rank c adds the last one; so at step i rank r works on chunk
    r - 1 - i. On CUDA inside a node each partial is pushed to its owner by the copy engines
    instead (copy_engine.py), through `region` of its workspace."""
    x = x.contiguous()
    if copy_engine.usable(x, group):
        return _ce_linear_reduce_scatter(x, weight, group, region)
    ring = _Ring(group)
    chunk = x.size(0) // ring.size
    w_t = weight.t()  # [in/tp, out]
    shape = (chunk,) + tuple(x.shape[1:-1]) + (weight.size(0),)  # [s/tp, b, out]
    works, incoming, sending = [], None, None
    for i in range(ring.size):
        c = (ring.rank - 1 - i) % ring.size
        part = x.new_empty(shape)
        _mm_into(part, x[c * chunk:(c + 1) * chunk], w_t, None)  # this rank's share of chunk c
        _wait(works)  # the running sum of chunk c arrived (and our previous send left)
        if incoming is not None:
            part.add_(incoming)
        if i == ring.size - 1:
            return part
        incoming, sending = torch.empty_like(part), part  # keep `sending` alive while in flight
        works = ring.shift(sending, incoming, leftwards=False)
    raise AssertionError("unreachable")


def all_gather_matmul(g: torch.Tensor, weight: torch.Tensor | None, group, bias: torch.Tensor | None = None,
                      region: int = copy_engine.FENCED) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather g `[s/tp, b, k]` to `[s, b, k]` and, when `weight` `[k, n]` is given, compute
    `G weight (+ bias)` `[s, b, n]` chunk by chunk as the chunks arrive. Returns (gathered G,
    product or None). Row-parallel backward: g the output gradient, weight W `[out, in/tp]`,
    and G feeds the weight gradient. Column-parallel forward: g the input, weight W^T
    `[in, out/tp]`, and G is saved for the weight gradient (no re-gather in backward).
    `region`: of the copy engines' workspace (copy_engine.py)."""
    g = g.contiguous()
    size, chunk = group_size(group), g.size(0)
    full = g.new_empty((chunk * size,) + tuple(g.shape[1:]))  # [s, b, k]
    dx = None
    if weight is not None:
        dx = g.new_empty(tuple(full.shape[:-1]) + (weight.size(1),))  # [s, b, n]

    def rows(t, c):
        return t[c * chunk:(c + 1) * chunk]  # contiguous: the sequence dim is leading

    if copy_engine.usable(g, group):
        for c, cur in copy_engine.gather_chunks(g, group, lambda owner: rows(full, owner), region):
            if dx is not None:
                _mm_into(rows(dx, c), cur, weight, bias)  # [s/tp, b, n]
        return full, dx
    ring = _Ring(group)
    rows(full, ring.rank).copy_(g)
    for i in range(ring.size):
        c = (ring.rank + i) % ring.size
        works = []
        if i < ring.size - 1:  # receive chunk c+1 into its place while chunk c is multiplied
            works = ring.shift(rows(full, c), rows(full, (c + 1) % ring.size), leftwards=True)
        if dx is not None:
            _mm_into(rows(dx, c), rows(full, c), weight, bias)  # [s/tp, b, n]
        _wait(works)
    return full, dx


def _ce_linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group, region: int) -> torch.Tensor:
    """linear_reduce_scatter with copy-engine pushes: x `[s, b, in/tp]` -> `[s/tp, b, out]`."""
    chunk = x.size(0) // group_size(group)
    w_t = weight.t()  # [in/tp, out]
    shape = (chunk,) + tuple(x.shape[1:-1]) + (weight.size(0),)  # [s/tp, b, out]

    def part(c: int) -> torch.Tensor:
        p = x.new_empty(shape)
        _mm_into(p, x[c * chunk:(c + 1) * chunk], w_t, None)  # this rank's share of chunk c
        return p

    return copy_engine.reduce_scatter_parts(part, shape, x.dtype, x.device, group, region)

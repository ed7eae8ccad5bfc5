"""Plain (non-autograd) tensor-parallel collectives that work on any backend.

Every helper takes `group`: a ProcessGroup, or None meaning a group of size 1, for which the
helper is the identity and no communication happens (a single-process run needs no
torch.distributed). On NCCL the single-buffer collectives (`all_gather_single` /
`reduce_scatter_single`, named `*_into_tensor` / `*_tensor` before torch 2.13) are used; gloo
implements neither reduce_scatter nor (reliably) the single-buffer all-gather, so there the
helpers fall back to `all_gather` into a list and
all_reduce-then-take-own-chunk. The fallbacks move more bytes but only run in CPU tests.

`async_op=True` returns a `Pending` whose `wait()` gives the result, so that a backward pass
can overlap communication with a GEMM (layers.py). The gloo fallbacks of reduce_scatter
finish their post-processing inside `wait()` too, so callers never branch on the backend.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


class Pending:
    """A collective in flight: `wait()` blocks until it is done and returns its result:
    `value` as is, or what `finish()` makes of the received buffers. A slotted class rather
    than a dataclass with a closure: TP makes ~1,000 of these per GPT-1.3B step, on the
    host-bound path (issue 13)."""

    __slots__ = ("work", "value", "finish")

    def __init__(self, work, value: torch.Tensor | None = None,
                 finish: Callable[[], torch.Tensor] | None = None):
        self.work = work  # torch.distributed Work handle; None when already complete
        self.value, self.finish = value, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.value if self.finish is None else self.finish()


# torch 2.13 deprecates the *_tensor names (a warning and a wrapper per call) for the *_single
# ones, which torch 2.11 may lack; same arguments in the same order.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    """Number of ranks in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This rank's index inside `group` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def _native(group) -> bool:
    """Whether the backend has the single-buffer collectives (NCCL does, gloo does not)."""
    return dist.get_backend(group) == dist.Backend.NCCL


def _done(x: torch.Tensor, async_op: bool):
    return Pending(None, x) if async_op else x


def _result(work, finish: Callable[[], torch.Tensor], async_op: bool):
    if async_op:
        return Pending(work, finish=finish)
    return finish()


def _ready(work, x: torch.Tensor, async_op: bool):
    """`x` once `work` is done: the result needs no post-processing."""
    return Pending(work, x) if async_op else x


def _check_divisible(x: torch.Tensor, dim: int, world: int) -> None:
    if x.size(dim) % world:
        raise ValueError(f"dimension {dim} of size {x.size(dim)} is not divisible by the "
                         f"tensor-parallel size {world}")


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """Reduce `x` over `group` IN PLACE and return it (or a Pending returning it).

    In place because every caller owns a fresh buffer (a GEMM output, a clone) and the
    tensor can be as large as `[s, b, h]`; callers that do not own `x` must clone first.
    """
    if group_size(group) == 1:
        return _done(x, async_op)
    work = dist.all_reduce(x, op=op, group=group, async_op=async_op)
    return _ready(work, x, async_op)


def all_gather(x: torch.Tensor, dim: int, group, async_op: bool = False, out: torch.Tensor | None = None):
    """Concatenate every rank's `x` along `dim` in rank order: `[.., n, ..] -> [.., n*tp, ..]`.

    `out` (dim 0 only): a preallocated `[n*tp, ..]` result, which `x` may be this rank's
    chunk of (in-place gather, as the distributed optimizer does with its param buffer).
    """
    world = group_size(group)
    if out is not None and dim % x.dim() != 0:
        raise ValueError("all_gather with `out` gathers along dim 0 only")
    if world == 1:
        if out is not None and out.data_ptr() != x.data_ptr():
            out.copy_(x)
        return _done(x if out is None else out, async_op)
    dim = dim % x.dim()
    x = x.contiguous()
    if _native(group):
        # One flat buffer holds the ranks' tensors back to back, i.e. stacked along a new
        # leading dim; along dim 0 that already is the concatenation (no copy).
        if out is None:
            out = x.new_empty((world * x.size(0),) + tuple(x.shape[1:]))  # [tp*n0, ...]
        work = _all_gather_flat(out, x, group=group, async_op=async_op)
        if dim == 0:
            return _ready(work, out, async_op)
        shape = list(x.shape)
        shape[dim] *= world

        def finish():
            # [tp, ..., n, ...] -> [..., tp, n, ...] -> [..., tp*n, ...] (one copy)
            return out.view((world,) + tuple(x.shape)).movedim(0, dim).reshape(shape)

        return _result(work, finish, async_op)
    parts = [torch.empty_like(x) for _ in range(world)]
    work = dist.all_gather(parts, x, group=group, async_op=async_op)
    if out is not None:
        return _result(work, lambda: torch.cat(parts, 0, out=out), async_op)  # [tp*n, ..]
    return _result(work, lambda: torch.cat(parts, dim), async_op)  # [.., tp*n, ..]


def reduce_scatter(x: torch.Tensor, dim: int, group, async_op: bool = False, op=dist.ReduceOp.SUM,
                   out: torch.Tensor | None = None):
    """Reduce `x` over `group` and keep this rank's chunk along `dim`: `[.., n, ..] -> [.., n/tp, ..]`.

    `x` itself is left unchanged, except where `out` (dim 0 only: a preallocated `[n/tp, ..]`
    result) is this rank's chunk of `x`, the in-place form the gradient buckets use.
    """
    world = group_size(group)
    if out is not None and dim % x.dim() != 0:
        raise ValueError("reduce_scatter with `out` scatters along dim 0 only")
    if world == 1:
        if out is not None and out.data_ptr() != x.data_ptr():
            out.copy_(x)
        return _done(x if out is None else out, async_op)
    dim = dim % x.dim()
    _check_divisible(x, dim, world)
    if _native(group):
        src = (x if dim == 0 else x.movedim(dim, 0)).contiguous()  # [n, ...]; no copy at dim 0
        if out is None:
            out = src.new_empty((src.size(0) // world,) + tuple(src.shape[1:]))  # [n/tp, ...]
        work = _reduce_scatter_flat(out, src, op=op, group=group, async_op=async_op)
        if dim == 0:
            return _ready(work, out, async_op)
        return _result(work, lambda: out.movedim(0, dim).contiguous(), async_op)
    # gloo: all-reduce a private copy, then keep our chunk; clone() so the result does not
    # pin the whole reduced buffer in memory.
    buf = x.clone(memory_format=torch.contiguous_format)
    work = dist.all_reduce(buf, op=op, group=group, async_op=async_op)
    chunk = x.size(dim) // world
    start = group_rank(group) * chunk
    if out is not None:
        return _result(work, lambda: out.copy_(buf.narrow(0, start, chunk)), async_op)
    return _result(work, lambda: buf.narrow(dim, start, chunk).clone(), async_op)


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`: `[.., n, ..] -> [.., n/tp, ..]`.

    A view (no copy) when the chunk is already contiguous, e.g. dim 0 of a contiguous tensor.
    """
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world)
    chunk = x.size(dim) // world
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()

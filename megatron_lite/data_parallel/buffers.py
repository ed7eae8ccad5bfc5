"""Contiguous parameter and gradient buffers of one model chunk, cut into buckets (spec §8.1).

A `ParamAndGradBuffer` holds the parameters of one (param dtype, grad dtype) pair. Every
parameter's `main_grad` is a view into one flat grad buffer; with the distributed optimizer
the parameters themselves also become views into one flat param buffer, so that a bucket's
updated shards can be all-gathered in place. The buffer is cut into `Bucket`s, the unit of
data-parallel communication. This file is pure layout: no communication happens here
(ddp.py launches the collectives, optimizer/distributed.py reads the shards).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# spec §8.1: with the distributed optimizer every param starts at a multiple of 64 elements
# (128-byte aligned for 16-bit params) and every bucket end is padded to lcm(DP, 128).
_PARAM_ALIGN = 64
_BUCKET_ALIGN = 128
_HIGH_BUSBW_ALIGN = 2**16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class Bucket:
    """One unit of DP communication: a contiguous slice `[offset, offset + numel)` of its buffer."""

    index: int  # position in the buffer; bucket 0 holds the last registered params
    params: list[torch.nn.Parameter]  # in buffer order (reverse registration order)
    offset: int  # first element in the buffer
    numel: int  # padded size; divisible by DP with the distributed optimizer
    numel_unpadded: int
    grad: torch.Tensor  # [numel] view of the grad buffer
    param: torch.Tensor | None  # [numel] view of the param buffer (distributed optimizer only)

    def shard_range(self, rank: int, world: int) -> tuple[int, int]:
        """This rank's shard `[rank*n/D, (rank+1)*n/D)` in bucket coordinates (spec §8.3)."""
        size = self.numel // world
        return rank * size, (rank + 1) * size


@dataclass(frozen=True)
class BufferLayout:
    """Where each parameter lives: `index[i] = (start, end, bucket)` for `params[i]`, plus the
    bucket boundaries `[(start, end_padded, numel_unpadded)]` and the total size."""

    index: list[tuple[int, int, int]]
    buckets: list[tuple[int, int, int]]
    numel: int


def plan_layout(sizes: list[int], bucket_size: int | None, shared: list[bool], dp_size: int,
                distributed: bool, pad_for_high_busbw: bool = False) -> BufferLayout:
    """Place params of `sizes` (already in buffer order) into buckets (spec §8.1).

    A bucket closes once it holds `bucket_size` elements; a `shared` param (tied embedding)
    gets a bucket of its own with the distributed optimizer, so that its shard ranges are the
    same on the first and last pipeline stage and the embedding-group sum stays elementwise.
    """
    bucket_align = math.lcm(dp_size, _BUCKET_ALIGN, *([_HIGH_BUSBW_ALIGN] if pad_for_high_busbw else []))
    pad_param = (lambda n: _round_up(n, _PARAM_ALIGN)) if distributed else (lambda n: n)
    pad_bucket = (lambda n: _round_up(n, bucket_align)) if distributed else (lambda n: n)
    index, buckets = [], []
    bucket_start, cursor, in_bucket = 0, 0, 0

    def close(end: int) -> int:
        nonlocal bucket_start, in_bucket
        padded = pad_bucket(end)
        buckets.append((bucket_start, padded, end - bucket_start))
        bucket_start, in_bucket = padded, 0
        return padded

    for n, own_bucket in zip(sizes, shared):
        own_bucket = own_bucket and distributed
        cursor = pad_param(cursor)
        if own_bucket and in_bucket:
            cursor = close(cursor)
        index.append((cursor, cursor + n, len(buckets)))
        in_bucket += 1
        cursor += n
        if own_bucket or (bucket_size is not None and cursor - bucket_start >= bucket_size):
            cursor = close(cursor)
    if in_bucket:
        cursor = close(cursor)
    return BufferLayout(index, buckets, cursor)


class ParamAndGradBuffer:
    """Flat grad buffer (and, for the distributed optimizer, flat param buffer) of `params`,
    which all share one param dtype; `grad_dtype` is fp32 or the param dtype (spec §7.1)."""

    def __init__(self, params: list[torch.nn.Parameter], grad_dtype: torch.dtype, dp_size: int,
                 bucket_size: int | None, distributed: bool, pad_for_high_busbw: bool = False):
        if not params:
            raise ValueError("a ParamAndGradBuffer needs at least one parameter")
        # Reverse registration order approximates the order in which backward produces grads
        # (spec §8.1), so buckets fill front to back and the first is ready first.
        self.params = list(reversed(params))
        self.param_dtype, self.grad_dtype = self.params[0].dtype, grad_dtype
        self.dp_size, self.distributed = dp_size, distributed
        device = self.params[0].device
        layout = plan_layout([p.numel() for p in self.params], bucket_size,
                             [bool(getattr(p, "shared_embedding", False)) for p in self.params],
                             dp_size, distributed, pad_for_high_busbw)
        self.numel = layout.numel
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)  # [numel]
        self.param_data = None
        if distributed:
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)  # [numel]
        self.param_range: dict[torch.nn.Parameter, tuple[int, int]] = {}
        for p, (start, end, _) in zip(self.params, layout.index):
            self.param_range[p] = (start, end)
            if self.param_data is not None:
                # The param becomes a view into the param buffer, so an all-gather of a bucket
                # refreshes it in place (spec §8.3).
                view = self.param_data[start:end].view_as(p)
                view.copy_(p.data)
                p.data = view
            p.main_grad = self.grad_data[start:end].view_as(p)
        self.buckets: list[Bucket] = []
        for i, (start, end, unpadded) in enumerate(layout.buckets):
            members = [p for p, (_, _, b) in zip(self.params, layout.index) if b == i]
            param_view = self.param_data[start:end] if self.param_data is not None else None
            self.buckets.append(Bucket(i, members, start, end - start, unpadded,
                                       self.grad_data[start:end], param_view))

    def zero_grad(self) -> None:
        self.grad_data.zero_()

    def scale_grad(self, factor: float) -> None:
        self.grad_data.mul_(factor)

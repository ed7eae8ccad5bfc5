"""Autograd-aware tensor- and sequence-parallel region boundaries (Megatron's mappings).

Each function is a collective whose backward is its adjoint (Shoeybi et al. 2019, "f" and
"g" operators; Korthikanti et al. 2022 for the sequence-parallel pairs):

    copy_to_tp_region                    fwd identity            bwd all-reduce
    reduce_from_tp_region                fwd all-reduce          bwd identity
    scatter_to_tp_region                 fwd split last dim      bwd all-gather last dim
    gather_from_tp_region                fwd all-gather last dim bwd split last dim
    scatter_to_sequence_parallel_region  fwd split dim 0         bwd all-gather dim 0
    gather_from_sequence_parallel_region fwd all-gather dim 0    bwd reduce-scatter dim 0 (or split)
    reduce_scatter_to_sequence_parallel_region
                                         fwd reduce-scatter dim 0 bwd all-gather dim 0

With a group of size 1 (or None) every function returns its input unchanged and adds no
autograd node. Shapes use the sequence-first notation `[s, b, h]`.
"""
from __future__ import annotations

import torch

from megatron_lite.tensor_parallel.collectives import (
    all_gather,
    all_reduce,
    group_size,
    reduce_scatter,
    split,
)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # Clone before the in-place all-reduce: autograd may hand the same gradient tensor to
        # sibling branches (e.g. both inputs of a residual add), which an in-place reduce would
        # corrupt. ColumnParallelLinear avoids this copy by reducing its own GEMM output.
        return all_reduce(grad.clone(), ctx.group), None  # [s, b, h] summed over tp


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # In place (as Megatron) to avoid a copy of `[s, b, h]`; mark_dirty keeps autograd
        # correct and makes it raise if someone saved `x` for their backward.
        ctx.mark_dirty(x)
        return all_reduce(x, group)  # [s, b, h] summed over tp

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, -1, group)  # [s, b, h] -> [s, b, h/tp]

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, -1, ctx.group), None  # [s, b, h/tp] -> [s, b, h]


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, -1, group)  # [s, b, h/tp] -> [s, b, h]

    @staticmethod
    def backward(ctx, grad):
        return split(grad, -1, ctx.group), None  # [s, b, h] -> [s, b, h/tp]


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, 0, group)  # [s, b, h] -> [s/tp, b, h]

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 0, ctx.group), None  # [s/tp, b, h] -> [s, b, h]


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return all_gather(x, 0, group)  # [s/tp, b, h] -> [s, b, h]

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            # The consumer is tensor-parallel: each rank holds a partial gradient.
            return reduce_scatter(grad, 0, ctx.group), None, None  # [s, b, h] -> [s/tp, b, h]
        # The consumer is replicated: every rank holds the full gradient already.
        return split(grad, 0, ctx.group), None, None  # [s, b, h] -> [s/tp, b, h]


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 0, group)  # [s, b, h] -> [s/tp, b, h] summed over tp

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 0, ctx.group), None  # [s/tp, b, h] -> [s, b, h]


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, gradient all-reduced over `group`."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region: all-reduce (sum) forward, identity backward.

    Reduces `x` IN PLACE and returns it: pass a tensor you own (e.g. a GEMM output). A leaf
    that requires grad cannot be modified in place; autograd raises in that case.
    """
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim `[s, b, h] -> [s, b, h/tp]`; backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dim `[s, b, h/tp] -> [s, b, h]`; backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's sequence chunk `[s, b, h] -> [s/tp, b, h]`; backward all-gathers dim 0."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence `[s/tp, b, h] -> [s, b, h]`.

    Backward reduce-scatters dim 0 when the consumer is tensor-parallel (its gradients are
    partial sums), or only splits it when the consumer is replicated over TP
    (`tensor_parallel_output_grad=False`).
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over TP and keep this rank's sequence chunk `[s, b, h] -> [s/tp, b, h]`;
    backward all-gathers dim 0."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)

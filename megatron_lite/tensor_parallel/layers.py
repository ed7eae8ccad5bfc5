"""Column- and row-parallel linear layers (Shoeybi et al. 2019, §3) with optional sequence
parallelism (Korthikanti et al. 2022, §4.2.2).

Column-parallel: weight split along the output dim, `[out/tp, in]`; the input is replicated
(or, with sequence parallelism, all-gathered from `[s/tp, b, in]`), the output is split.
Row-parallel: weight split along the input dim, `[out, in/tp]`; the input is split, the
partial outputs are all-reduced (or reduce-scattered to `[s/tp, b, out]`).

The column-parallel GEMM is one autograd Function (`_LinearWithTP`, also exposed as
`linear_with_tp` for externally owned weights such as a tied output layer) because that lets
its backward (a) keep only the local `[s/tp, b, in]` input under sequence parallelism and
re-gather it, (b) overlap both the re-gather and the input-gradient reduction with GEMMs, and
(c) accumulate the weight gradient straight into the fp32 `main_grad` (gradient-accumulation
fusion, on by default as in Megatron), as Megatron's
`LinearWithGradAccumulationAndAsyncCommunication` does. The row-parallel GEMM uses the same
Function without a group for (c). Megatron runs with CUDA_DEVICE_MAX_CONNECTIONS=1 so that
the collectives start before the GEMMs queued after them; here that cost 18% at TP2 on 2xH200
(pretrain says so in one line), the hardware queues already overlapping them. With
`tp_comm_overlap` (--tp-comm-overlap, SP only) the forward all-gather, the row-parallel
reduce-scatter and its backward all-gather, and the column-parallel input-gradient
reduce-scatter become ring collective matmuls (overlap.py), so none of them is exposed, and
the column-parallel input is saved gathered (the ring builds it anyway), so backward has
nothing to re-gather.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron_lite.fused.wgrad import accumulate_bgrad_, accumulate_wgrad_
from megatron_lite.tensor_parallel import copy_engine
from megatron_lite.tensor_parallel.collectives import (
    all_gather,
    all_reduce,
    group_size,
    reduce_scatter,
)
from megatron_lite.tensor_parallel.mappings import (
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megatron_lite.tensor_parallel.overlap import all_gather_matmul, linear_reduce_scatter
from megatron_lite.tensor_parallel.sharding import mark_parallel, mark_sequence_parallel

# --tp-comm-overlap's copy-engine workspace regions (forward, backward), copy_engine.py: in a
# transformer layer the column and row linears alternate FIRST and SECOND, so consecutive
# transfers never share a region; any other linear (the output layer) takes FENCED.
_COLUMN_REGIONS = (copy_engine.FIRST, copy_engine.SECOND)
_ROW_REGIONS = (copy_engine.SECOND, copy_engine.FIRST)
_FENCED_REGIONS = (copy_engine.FENCED, copy_engine.FENCED)


def accumulates_in_main_grad(weight: torch.Tensor) -> bool:
    """Whether a weight gradient may go straight into `weight.main_grad`: the param lives in a
    DDP grad buffer whose post-accumulate hook drops the placeholder gradient and clears
    `grad_added_to_main_grad` (data_parallel/ddp.py; Megatron's protocol, spec §7.1)."""
    return torch.is_grad_enabled() and _in_grad_buffer(weight)


def _in_grad_buffer(param: torch.Tensor | None) -> bool:
    """accumulates_in_main_grad without the grad-mode test, for inside a Function's forward
    (grad mode is off there) once the caller has decided to fuse."""
    return (param is not None and param.requires_grad and hasattr(param, "main_grad")
            and hasattr(param, "grad_added_to_main_grad"))


class _LinearWithTP(torch.autograd.Function):
    """`y = x W^T + b` with x entering a TP region: all-gathered along the sequence (SP) or
    replicated (its gradient all-reduced). With `group` None it is a local GEMM (TP=1, or the
    row-parallel GEMM, whose reduction follows it), kept as a Function for `fuse_wgrad`:
    the weight gradient accumulates into `main_grad` (fused/wgrad.py) and autograd gets an
    uninitialized placeholder instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel, fuse_wgrad, regions=None, placeholder=True):
        # regions: None, or with --tp-comm-overlap the copy-engine workspace regions of the
        # forward and the backward (copy_engine.py); placeholder: see _weight_grad
        ctx.group, ctx.sequence_parallel, ctx.placeholder = group, sequence_parallel, placeholder
        ctx.overlap = sequence_parallel and regions is not None
        ctx.regions = regions
        # The Parameter itself: a saved tensor may come back as a detached copy without
        # `main_grad` (non-reentrant activation checkpointing recomputes saved tensors).
        # (`fuse_wgrad` is decided by the caller: grad mode is off inside forward.)
        ctx.main_grad_param = weight if fuse_wgrad else None
        ctx.main_grad_bias = bias if fuse_wgrad and _in_grad_buffer(bias) else None
        if ctx.overlap:
            # The ring leaves the gathered input behind: saved, it spares backward the
            # re-gather (a collective competing with the GEMMs for SMs) for (tp-1)/tp of the
            # input's memory more per layer, the --tp-comm-overlap trade.
            # full: [s, b, in], y: [s, b, out/tp]
            full, y = all_gather_matmul(x, weight.t(), group, bias, region=regions[0])
            ctx.save_for_backward(full, weight)
            return y
        # Save the local input only: under SP it is 1/tp of the gathered one (the memory
        # saving that motivates SP); backward gathers it again.
        ctx.save_for_backward(x, weight)
        if sequence_parallel:
            x = all_gather(x, 0, group)  # [s/tp, b, in] -> [s, b, in]
        return F.linear(x, weight, bias)  # [s, b, out/tp]

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: [s, b, out/tp]
        if ctx.overlap:
            return _overlapped_column_backward(ctx, grad_out)
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        group, sp = ctx.group, ctx.sequence_parallel
        gathering = all_gather(x, 0, group, async_op=True) if sp and need_w else None  # [s, b, in]
        grad_x = reducing = None
        if need_x:
            # A fresh GEMM output, so the in-place all-reduce below cannot alias anyone's grad.
            grad_x = grad_out.matmul(weight)  # [s, b, in], partial over this rank's columns
        total_x = gathering.wait() if gathering is not None else x  # [s, b, in]
        if need_x and group is not None:
            if sp:
                reducing = reduce_scatter(grad_x, 0, group, async_op=True)  # -> [s/tp, b, in]
            else:
                reducing = all_reduce(grad_x, group, async_op=True)  # [s, b, in] summed over tp
        grad_w = grad_b = None
        if need_w or need_b:
            g2d = grad_out.reshape(-1, grad_out.size(-1))  # [s*b, out/tp]
        if need_w:
            grad_w = _weight_grad(ctx.main_grad_param, g2d, total_x.reshape(-1, total_x.size(-1)),
                                  ctx.placeholder)
        if need_b:
            grad_b = _bias_grad(ctx.main_grad_bias, g2d)  # [out/tp]
        if reducing is not None:
            grad_x = reducing.wait()
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _overlapped_column_backward(ctx, grad_out: torch.Tensor) -> tuple:
    """_LinearWithTP's backward under --tp-comm-overlap: the input was saved gathered
    `[s, b, in]`; the input gradient `grad_out W` is reduce-scattered to `[s/tp, b, in]` as a
    ring collective matmul (each chunk's partial GEMM hiding a transfer), then the weight
    gradient GEMM runs."""
    total_x, weight = ctx.saved_tensors  # [s, b, in], [out/tp, in]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:
        # linear_reduce_scatter(x, w) is reduce_scatter(x w^T); here w^T = W: [out/tp, in].
        grad_x = linear_reduce_scatter(grad_out, weight.t(), ctx.group,
                                       region=ctx.regions[1])  # [s/tp, b, in]
    g2d = grad_out.reshape(-1, grad_out.size(-1))  # [s*b, out/tp]
    if need_w:
        grad_w = _weight_grad(ctx.main_grad_param, g2d, total_x.reshape(-1, total_x.size(-1)),
                              ctx.placeholder)
    if need_b:
        grad_b = _bias_grad(ctx.main_grad_bias, g2d)  # [out/tp]
    return grad_x, grad_w, grad_b, None, None, None, None, None


class _LinearReduceScatter(torch.autograd.Function):
    """Row-parallel `reduce_scatter(x W^T)` to `[s/tp, b, out]` as one ring collective matmul
    (--tp-comm-overlap, overlap.py); backward all-gathers the gradient in the same ring while
    multiplying the chunks that have arrived."""

    @staticmethod
    def forward(ctx, x, weight, group, fuse_wgrad, regions):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.main_grad_param, ctx.regions = group, weight if fuse_wgrad else None, regions
        return linear_reduce_scatter(x, weight, group, region=regions[0])  # [s, b, in/tp] -> [s/tp, b, out]

    @staticmethod
    def backward(ctx, grad_out):  # [s/tp, b, out]
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        # [s/tp, b, out] -> gathered [s, b, out], and its product with W [s, b, in/tp]
        full, grad_x = all_gather_matmul(grad_out, weight if need_x else None, ctx.group,
                                         region=ctx.regions[1])
        grad_w = None
        if need_w:
            grad_w = _weight_grad(ctx.main_grad_param, full.reshape(-1, full.size(-1)),
                                  x.reshape(-1, x.size(-1)))  # [out, in/tp]
        return grad_x, grad_w, None, None, None


def _weight_grad(param, g2d: torch.Tensor, x2d: torch.Tensor,
                 placeholder: bool = True) -> torch.Tensor | None:
    """`[out, in]` weight gradient of g2d `[T, out]`, x2d `[T, in]`; with `param` (fusion on)
    accumulated into `param.main_grad` instead, returning a placeholder (or None, when
    `placeholder` is False: another fused user of the weight returns it)."""
    if param is None:
        return g2d.t().matmul(x2d)  # [out, in]
    accumulate_wgrad_(param.main_grad, g2d, x2d)  # main_grad [out, in] += g2d^T x2d, in place
    param.grad_added_to_main_grad = True
    # Returning None from the weight's only user would skip its AccumulateGrad node and with
    # it DDP's post-accumulate hook, which counts the param ready for its bucket's reduction.
    # An uninitialized tensor costs no kernel; the hook discards it (Megatron does the same).
    # With two fused users (the tied head beside its embedding lookup) one placeholder is
    # enough: two would cost a `[V, h]` add of garbage in autograd.
    return torch.empty_like(param) if placeholder else None


def _bias_grad(param, g2d: torch.Tensor) -> torch.Tensor:
    """`[out]` bias gradient of g2d `[T, out]`; with `param` (fusion on) accumulated into
    `param.main_grad` instead, returning a placeholder (see _weight_grad)."""
    if param is None:
        return g2d.sum(0)
    accumulate_bgrad_(param.main_grad, g2d)
    param.grad_added_to_main_grad = True
    return torch.empty_like(param)


class _AddBias(torch.autograd.Function):
    """`y += bias` in place (the row-parallel bias, after the reduction), its gradient summed
    straight into `bias.main_grad` (gradient-accumulation fusion)."""

    @staticmethod
    def forward(ctx, y, bias):  # y: [s(/tp), b, out], the reduction's own fresh buffer
        ctx.mark_dirty(y)
        ctx.bias = bias  # the Parameter itself, as _LinearWithTP keeps its weight
        return y.add_(bias)

    @staticmethod
    def backward(ctx, grad):
        return grad, _bias_grad(ctx.bias, grad.reshape(-1, grad.size(-1)))


def linear_with_tp(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tp_group,
    sequence_parallel: bool,
    gather_output: bool = False,
    fuse_wgrad: bool = False,
    overlap: bool = False,
    alternating: bool = False,
    tied_lookup: bool = False,
) -> torch.Tensor:
    """Column-parallel `x W^T + b` for a weight owned elsewhere (e.g. the tied output layer,
    weight `[V/tp, h]`).

    x: `[s, b, in]`, or `[s/tp, b, in]` with sequence_parallel. Returns `[s, b, out/tp]`, or
    `[s, b, out]` when gather_output (not allowed with sequence_parallel, as in Megatron: the
    vocab-parallel loss consumes the split output). `fuse_wgrad`: gradient-accumulation
    fusion. `tied_lookup`: the weight is also the embedding table of a lookup in the same
    graph that accumulates into `main_grad` as well (VocabParallelEmbedding's fused lookup):
    this GEMM then returns no placeholder gradient, the lookup's is the one DDP's hook sees.
    `overlap`: the sequence-parallel all-gather as a ring collective matmul (overlap.py);
    `alternating`: a transformer layer's column-parallel linear, whose copy-engine transfers
    may skip a barrier (copy_engine.py).
    """
    if gather_output and sequence_parallel:
        raise ValueError("gather_output is not supported together with sequence_parallel")
    fuse_wgrad = fuse_wgrad and accumulates_in_main_grad(weight)
    if group_size(tp_group) == 1 and not fuse_wgrad:
        y = F.linear(x, weight, bias)  # [s, b, out]
    else:
        regions = None
        if overlap:
            regions = _COLUMN_REGIONS if alternating else _FENCED_REGIONS
        y = _LinearWithTP.apply(x, weight, bias, tp_group, sequence_parallel, fuse_wgrad,
                                regions, not tied_lookup)  # [s, b, out/tp]
    if gather_output:
        y = gather_from_tp_region(y, tp_group)  # [s, b, out/tp] -> [s, b, out]
    return y


def local_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 fuse_wgrad: bool = False, tied_lookup: bool = False) -> torch.Tensor:
    """`x W^T + b` without communication (TP=1, or the row-parallel partial GEMM); through
    `_LinearWithTP` only when the weight gradient goes into `main_grad`, else plain autograd."""
    if fuse_wgrad and accumulates_in_main_grad(weight):
        return _LinearWithTP.apply(x, weight, bias, None, False, True, None, not tied_lookup)
    return F.linear(x, weight, bias)


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({tp})")
    return n // tp


class ColumnParallelLinear(torch.nn.Module):
    """`Y = X A^T + b` with A split along its output dim: weight `[out/tp, in]`, bias `[out/tp]`.

    forward(x `[s, b, in]`, or `[s/tp, b, in]` with sequence_parallel) -> `[s, b, out/tp]`,
    or `[s, b, out]` with gather_output. `partition_stride` > 1 marks a weight made of that
    many stacked parts (SwiGLU `[gate; up]`: 2), so each rank gets its chunk of every part.
    `gradient_accumulation_fusion`: the weight gradient accumulates into `weight.main_grad`
    when the weight has one (fused/wgrad.py). `tp_comm_overlap` (with sequence_parallel): the
    input all-gather as a ring collective matmul (overlap.py). `alternating`: one of the four
    SP linears of a transformer layer, whose copy-engine transfers skip a barrier
    (copy_engine.py); False elsewhere (the output layer).
    Parameters start at zero; the model's init pass (models/init.py) fills them.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 partition_stride: int = 1, params_dtype: torch.dtype = torch.float32, device=None,
                 gradient_accumulation_fusion: bool = False, tp_comm_overlap: bool = False,
                 alternating: bool = False):
        super().__init__()
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        self.tp_comm_overlap, self.alternating = tp_comm_overlap, alternating
        if gather_output and sequence_parallel:
            raise ValueError("gather_output is not supported together with sequence_parallel")
        self.input_size, self.output_size = input_size, output_size
        self.tp_group, self.gather_output = tp_group, gather_output
        self.sequence_parallel, self.partition_stride = sequence_parallel, partition_stride
        tp = group_size(tp_group)
        _divide(output_size, tp * partition_stride, "output_size")
        local_out = output_size // tp
        self.weight = torch.nn.Parameter(
            torch.zeros(local_out, input_size, dtype=params_dtype, device=device))  # [out/tp, in]
        mark_parallel(self.weight, 0, partition_stride)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(local_out, dtype=params_dtype, device=device))
            mark_parallel(self.bias, 0, partition_stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, consume_weight: Callable | None = None):
        """`consume_weight(x, weight, bias)`, if given, replaces the GEMM and its result is
        returned: a caller that applies the weight its own way (the sequence-chunked output
        layer + loss, models/output_loss.py) does so inside this module's call, so forward
        pre-hooks on it (the distributed optimizer's param-gather wait, spec §8.3) still run
        before the weight is read."""
        if consume_weight is not None:
            return consume_weight(x, self.weight, self.bias)
        return linear_with_tp(x, self.weight, self.bias, self.tp_group, self.sequence_parallel,
                              self.gather_output, self.gradient_accumulation_fusion, self.tp_comm_overlap,
                              self.alternating)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={group_size(self.tp_group)}, "
                f"sequence_parallel={self.sequence_parallel}, stride={self.partition_stride}")


class RowParallelLinear(torch.nn.Module):
    """`Y = X A^T + b` with A split along its input dim: weight `[out, in/tp]`, bias `[out]`
    replicated and added once, after the reduction.

    forward(x `[s, b, in/tp]`, or `[s, b, in]` when not input_is_parallel) -> `[s, b, out]`
    summed over TP, or `[s/tp, b, out]` (reduce-scattered) with sequence_parallel.
    `gradient_accumulation_fusion`: as in ColumnParallelLinear. `tp_comm_overlap` (with
    sequence_parallel): GEMM and reduce-scatter as one ring collective matmul (overlap.py).
    `alternating`: as in ColumnParallelLinear.
    Parameters start at zero; the model's init pass (models/init.py) fills them.
    """

    def __init__(self, input_size: int, output_size: int, *, tp_group, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 gradient_accumulation_fusion: bool = False, tp_comm_overlap: bool = False,
                 alternating: bool = False):
        super().__init__()
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        self.tp_comm_overlap, self.alternating = tp_comm_overlap, alternating
        if sequence_parallel and not input_is_parallel:
            # The SP reduce-scatter assumes the column-parallel layer before it split the input.
            raise ValueError("sequence_parallel requires input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.tp_group, self.input_is_parallel = tp_group, input_is_parallel
        self.sequence_parallel = sequence_parallel
        local_in = _divide(input_size, group_size(tp_group), "input_size")
        self.weight = torch.nn.Parameter(
            torch.zeros(output_size, local_in, dtype=params_dtype, device=device))  # [out, in/tp]
        mark_parallel(self.weight, 1)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=params_dtype, device=device))
            if sequence_parallel:
                # Each rank's bias gradient covers only its sequence chunk: sum over TP.
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, fuse = self.tp_group, self.gradient_accumulation_fusion
        if group_size(group) == 1:
            return local_linear(x, self.weight, self.bias, fuse)  # [s, b, out]
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, group)  # [s, b, in] -> [s, b, in/tp]
        if self.sequence_parallel and self.tp_comm_overlap:
            fuse = fuse and accumulates_in_main_grad(self.weight)
            regions = _ROW_REGIONS if self.alternating else _FENCED_REGIONS
            y = _LinearReduceScatter.apply(x, self.weight, group, fuse, regions)  # -> [s/tp, b, out]
        else:
            y = local_linear(x, self.weight, None, fuse)  # [s, b, out], partial sum over tp
            if self.sequence_parallel:
                y = reduce_scatter_to_sequence_parallel_region(y, group)  # -> [s/tp, b, out]
            else:
                y = reduce_from_tp_region(y, group)  # [s, b, out] summed over tp (in place)
        if self.bias is not None:
            # After the reduction, so the bias is counted once; in place because `y` is the
            # reduction's own fresh buffer that nothing saved for backward.
            if self.gradient_accumulation_fusion and accumulates_in_main_grad(self.bias):
                y = _AddBias.apply(y, self.bias)
            else:
                y = y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={group_size(self.tp_group)}, "
                f"sequence_parallel={self.sequence_parallel}, tp_comm_overlap={self.tp_comm_overlap}")

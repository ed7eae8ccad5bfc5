"""Gradient-accumulation fusion (spec §7.1, §11): the weight-gradient GEMM of a linear layer
accumulates straight into the parameter's `main_grad` (the fp32 DDP grad buffer) instead of
producing a fresh `[out, in]` gradient per micro-batch that a hook then adds.

Megatron calls Apex's `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`, a cuBLAS GEMM
with bf16/fp16 operands, an fp32 C matrix and beta = 1. PyTorch exposes the same GEMM as
`aten::addmm.dtype_out` (CUDA, torch >= 2.8): operands in the param dtype, accumulation and
output in fp32, `out` aliasing `self` so C is read and written in place. Same-dtype operands
(fp32 params, or a bf16 `main_grad` with --grad-reduce-in-bf16) are a plain `addmm_`, which
is also what the CPU tests run. `reference` is the unfused computation: a separate GEMM in
`main_grad`'s dtype, then an add.

A bias's gradient is the column sum of the output gradient. `accumulate_bgrad_` adds it to
the bias's fp32 `main_grad` by the same mixed-dtype GEMM, ones `[1, T]` times the gradient
`[T, out]` (a GEMV with fp32 accumulation and C = main_grad), instead of a bf16 reduction
whose `[out]` result autograd hands to DDP's hook for an add of its own.
"""
from __future__ import annotations

import torch


def _mixed_dtype_addmm_available() -> bool:
    return hasattr(torch.ops.aten.addmm, "dtype_out")


def _require_mixed_dtype_addmm(main_grad: torch.Tensor, what: str) -> None:
    """Raise unless the bf16/fp16 -> fp32 GEMM into `main_grad` exists. DESIGN rule 6: no
    silent fallback to an fp32 GEMM on the GPU (many times slower)."""
    if main_grad.dtype != torch.float32 or not _mixed_dtype_addmm_available():
        raise RuntimeError(
            f"gradient-accumulation fusion of {what} into a {main_grad.dtype} main_grad needs "
            "torch.ops.aten.addmm.dtype_out (torch >= 2.8) and an fp32 main_grad; pass "
            "--no-gradient-accumulation-fusion")


def accumulate_wgrad_(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """`main_grad [out, in] += grad_out^T @ x` for grad_out `[T, out]`, x `[T, in]` (T: tokens).

    In place, one GEMM with beta = 1 and no `[out, in]` temporary."""
    g_t = grad_out.t()  # [out, T], a transposed view: cuBLAS/BLAS read it as is
    if x.dtype == main_grad.dtype:
        main_grad.addmm_(g_t, x)
        return
    if not main_grad.is_cuda:
        # CPU (tests): the same accumulation with fp32 operands; bf16 GEMMs on CPU are slow
        # and round differently, and the mixed-dtype GEMM has no CPU kernel.
        main_grad.addmm_(g_t.to(main_grad.dtype), x.to(main_grad.dtype))
        return
    _require_mixed_dtype_addmm(main_grad, f"{x.dtype} weights")
    # bf16/fp16 x bf16/fp16 -> fp32 with C = main_grad, beta = 1: Apex's wgrad_gemm_accum_fp32.
    torch.ops.aten.addmm.dtype_out(main_grad, g_t, x, torch.float32, out=main_grad)


def reference(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """The unfused path: the GEMM in the operands' dtype, then an add into `main_grad`."""
    main_grad.add_(grad_out.t().matmul(x))  # [out, T] @ [T, in] -> [out, in]


def accumulate_bgrad_(main_grad: torch.Tensor, grad_out: torch.Tensor) -> None:
    """`main_grad [out] += grad_out.sum(0)` for grad_out `[T, out]`, in place."""
    if grad_out.dtype == main_grad.dtype:
        main_grad.add_(grad_out.sum(0))
        return
    if not main_grad.is_cuda:  # CPU (tests): fp32 operands, as accumulate_wgrad_
        main_grad.add_(grad_out.to(main_grad.dtype).sum(0))
        return
    _require_mixed_dtype_addmm(main_grad, f"a {grad_out.dtype} bias")
    c = main_grad.view(1, -1)  # [1, out]
    ones = grad_out.new_ones(1, grad_out.shape[0])  # [1, T]
    torch.ops.aten.addmm.dtype_out(c, ones, grad_out, torch.float32, out=c)

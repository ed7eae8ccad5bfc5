"""RMSNorm (`--normalization RMSNorm`, fused unless `--no-persist-layer-norm`) as Triton kernels
on CUDA: forward reads x once and writes y and the per-row 1/rms; backward reads x and dy
once, writes dx and per-program partial sums of the weight gradient. `triton_add_rms_norm`
also takes the residual add before the norm (a transformer layer's `residual + h`): the
forward writes the sum beside y, the backward adds the sum's own gradient into dx, sparing a
separate add kernel each way and a re-read of the sum (three `[tokens, h]` passes a layer).
`triton_rms_norm_keep` gives the same backward to a norm whose input is also the residual.

At Llama-3.2-1B's `[8192, 2048]` bf16 on an H200 (issue 13), the forward takes 19.5 us, where
the graph Inductor compiled from the PyTorch reference (`elementwise.rms_norm.reference`)
took 49 us of CUDA time per call (one pass over the bytes: ~14 us); the backward takes the
same as Inductor's (32 us); the partials are summed by fused/norm_grads.py (13 us a call by
ATen). End to end that measured 1.5 ms of a 943 ms step, within run-to-run noise (README).

Numerics follow the reference: statistics in fp32; the normalized row rounded to x's dtype,
then multiplied by gamma and rounded again; the backward takes the rounded values where the
reference's autograd does (gamma's gradient sums dy * round(x / rms) in fp32).
"""
from __future__ import annotations

import torch

from megatron_lite.fused import norm_grads

try:  # Triton ships with CUDA builds of torch; CPU-only installs don't have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None

# Rows of one backward program: its weight-gradient partial sum stays in registers while it
# walks them; 16 rows gives 512 programs at 8192 tokens, ~4 per H200 SM.
ROWS_PER_PROGRAM = 16
# Widest row one program holds in registers (fp32); wider hidden sizes take the reference.
MAX_HIDDEN = 16384

if triton is not None:

    @triton.jit
    def _rmsnorm_forward_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                                BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # normalize residual + x, stored rounded as the unfused add rounds it
            x += tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
        normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)  # the reference's .to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_backward_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dsum_ptr, dx_ptr, dw_partial_ptr, n_rows,
                                 n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_DSUM: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            if row < n_rows:
                x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                n = x * rstd
                dw += dy * n.to(dx_ptr.dtype.element_ty).to(tl.float32)
                # d normed, rounded as the reference's bf16 multiply backward rounds it
                dn = (dy * w).to(dx_ptr.dtype.element_ty).to(tl.float32)
                # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
                dx = rstd * (dn - n * (tl.sum(dn * n, 0) / n_cols))
                if HAS_DSUM:  # the residual stream's own gradient, added before the one rounding
                    dx += tl.load(dsum_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the row padded to a power of two, ~8 fp32 values per thread."""
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(1, block // 256))


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """(sum or None, y, 1/rms) for `[.., h]` inputs: y = RMSNorm(x (+ residual))."""
    n = x.shape[-1]
    x2d = x.reshape(-1, n)  # [tokens, h], a view of the contiguous input
    y = torch.empty_like(x2d)
    total = None if residual is None else torch.empty_like(x2d)  # [tokens, h]
    rstd = torch.empty(x2d.shape[0], dtype=torch.float32, device=x.device)  # [tokens]
    res2d = x2d if residual is None else residual.reshape(-1, n)
    block, warps = launch_config(n)
    _rmsnorm_forward_kernel[(x2d.shape[0],)](x2d, res2d, y if total is None else total, weight, y, rstd, n,
                                             eps, BLOCK=block, HAS_RESIDUAL=residual is not None,
                                             num_warps=warps)
    return total, y, rstd


def _backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
              dsum: torch.Tensor | None, grad_param) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx `[tokens, h]`, d gamma `[h]`) for the normalized input x; `dsum`, the gradient that
    reached x by another path (the residual stream), is added into dx. `grad_param`: gamma's
    parameter when its gradient goes into its `main_grad` (d gamma is then a placeholder)."""
    n = x.shape[-1]
    x2d, dy2d = x.reshape(-1, n), dy.reshape(-1, n)
    dy2d = dy2d if dy2d.is_contiguous() else dy2d.contiguous()
    dsum2d = None if dsum is None else dsum.reshape(-1, n).contiguous()
    rows = x2d.shape[0]
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dx = torch.empty_like(x2d)
    dw_partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)  # [programs, h]
    block, warps = launch_config(n)
    _rmsnorm_backward_kernel[(programs,)](x2d, weight, dy2d, rstd, dx if dsum2d is None else dsum2d, dx,
                                          dw_partial, rows, n, ROWS=ROWS_PER_PROGRAM, BLOCK=block,
                                          HAS_DSUM=dsum2d is not None, num_warps=warps)
    return dx, norm_grads.sum_partials(dw_partial, weight, grad_param)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, grad_param=None):
        _, y, rstd = _forward(x, weight, eps, None)
        ctx.save_for_backward(x, weight, rstd)
        ctx.grad_param = grad_param
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x, weight, rstd, dy, None, ctx.grad_param)
        return dx.view(x.shape), dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    """`(residual + h, RMSNorm(residual + h))` in one pass each way: the forward reads h and the
    residual once and writes the sum and y; the backward adds the sum's own gradient (from the
    residual stream) into dx, instead of a separate add kernel."""

    @staticmethod
    def forward(ctx, h, residual, weight, eps, grad_param=None):
        total, y, rstd = _forward(h, weight, eps, residual)
        ctx.save_for_backward(total, weight, rstd)
        ctx.grad_param = grad_param
        return total.view(h.shape), y.view(h.shape)

    @staticmethod
    def backward(ctx, dsum, dy):  # both materialized (zeros where unused)
        total, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(total, weight, rstd, dy, dsum, ctx.grad_param)
        dx = dx.view(dy.shape)
        return dx, dx, dw, None, None


class _RMSNormKeep(torch.autograd.Function):
    """`(x, RMSNorm(x))` for an x that is also a residual: the backward adds the gradient that
    reaches x through the residual into the norm's dx, instead of autograd adding the two by a
    kernel of its own."""

    @staticmethod
    def forward(ctx, x, weight, eps, grad_param=None):
        _, y, rstd = _forward(x, weight, eps, None)
        ctx.save_for_backward(x, weight, rstd)
        ctx.grad_param = grad_param
        return x, y.view(x.shape)

    @staticmethod
    def backward(ctx, dresidual, dy):  # both materialized (zeros where unused)
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x, weight, rstd, dy, dresidual, ctx.grad_param)
        return dx.view(x.shape), dw, None, None


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernels can take this call: CUDA tensors of one dtype (the Norm
    casts gamma to x's), Triton installed, a row that fits one program."""
    return (triton is not None and x.is_cuda and weight.dtype == x.dtype
            and 0 < x.shape[-1] <= MAX_HIDDEN and weight.shape == x.shape[-1:])


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, grad_param=None) -> torch.Tensor:
    """`[.., h]` -> `[.., h]`: `round(x / rms(x)) * gamma` with fp32 statistics (CUDA).
    `grad_param` (here and below): gamma's parameter, whose gradient then goes into its
    `main_grad` (fused/norm_grads.py); None for an ordinary gradient."""
    if not available(x, weight):
        raise RuntimeError("the Triton RMSNorm needs CUDA tensors of one dtype and Triton")
    return _RMSNorm.apply(x if x.is_contiguous() else x.contiguous(), weight.contiguous(), eps, grad_param)


def triton_add_rms_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float, grad_param=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[.., h]` twice -> `(residual + h, triton_rms_norm(residual + h))`, h and the residual of
    one dtype and shape (CUDA)."""
    if not (available(h, weight) and residual.dtype == h.dtype and residual.shape == h.shape):
        raise RuntimeError("the Triton RMSNorm needs CUDA tensors of one dtype and shape and Triton")
    return _AddRMSNorm.apply(h.contiguous(), residual.contiguous(), weight.contiguous(), eps,
                             grad_param)


def triton_rms_norm_keep(x: torch.Tensor, weight: torch.Tensor, eps: float,
                         grad_param=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[.., h]` -> `(x, triton_rms_norm(x))`, the residual gradient added in the norm's
    backward (CUDA)."""
    if not available(x, weight):
        raise RuntimeError("the Triton RMSNorm needs CUDA tensors of one dtype and Triton")
    return _RMSNormKeep.apply(x if x.is_contiguous() else x.contiguous(), weight.contiguous(), eps,
                              grad_param)

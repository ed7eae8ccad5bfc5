"""LayerNorm (`--normalization LayerNorm`, fused unless `--no-persist-layer-norm`) as Triton
kernels on CUDA, the counterpart of fused/rmsnorm.py: forward reads x once and writes y, the
per-row mean and 1/std; backward reads x and dy once, writes dx and per-program partial sums
of gamma's and beta's gradients; `triton_add_layer_norm` takes the residual add before the
norm too, and `triton_layer_norm_keep` the residual's gradient, as rmsnorm.py's.

ATen's kernels at GPT 1.3B's `[8192, 2048]` bf16 on an H200 took 37 us forward (one pass over
the bytes: ~14 us) and 34 + 47 us backward, the second kernel only for gamma and beta: 46 ms
of a 1.1 s step (issue 13).

Numerics are F.layer_norm's: statistics and the affine map in fp32, one rounding per output;
gamma's and beta's gradients summed in fp32 and rounded once.
"""
from __future__ import annotations

import torch

from megatron_lite.fused import norm_grads
from megatron_lite.fused.rmsnorm import MAX_HIDDEN, ROWS_PER_PROGRAM, launch_config

try:  # Triton ships with CUDA builds of torch; CPU-only installs don't have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None

if triton is not None:

    @triton.jit
    def _layernorm_forward_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols,
                                  eps, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # normalize residual + x, stored rounded as the unfused add rounds it
            x += tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n_cols + cols, x, mask=mask)
            x = x.to(tl.float32)
        mean = tl.sum(x, 0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _layernorm_backward_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dsum_ptr, dx_ptr, dw_partial_ptr,
                                   db_partial_ptr, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                                   HAS_DSUM: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            if row < n_rows:
                x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
                dw += dy * xhat
                db += dy
                wdy = w * dy
                # dx = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))
                c1 = tl.sum(xhat * wdy, 0) / n_cols
                c2 = tl.sum(wdy, 0) / n_cols
                dx = (wdy - (xhat * c1 + c2)) * tl.load(rstd_ptr + row)
                if HAS_DSUM:  # the residual stream's own gradient, added before the one rounding
                    dx += tl.load(dsum_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)
        tl.store(db_partial_ptr + pid.to(tl.int64) * n_cols + cols, db, mask=mask)


def _forward(x, weight, bias, eps, residual):
    """(sum or None, y, stats `[2, tokens]` = mean, 1/std): y = LayerNorm(x (+ residual))."""
    n = x.shape[-1]
    x2d = x.reshape(-1, n)  # [tokens, h], a view of the contiguous input
    y = torch.empty_like(x2d)
    total = None if residual is None else torch.empty_like(x2d)  # [tokens, h]
    stats = torch.empty(2, x2d.shape[0], dtype=torch.float32, device=x.device)  # mean, 1/std
    res2d = x2d if residual is None else residual.reshape(-1, n)
    block, warps = launch_config(n)
    _layernorm_forward_kernel[(x2d.shape[0],)](x2d, res2d, y if total is None else total, weight, bias, y,
                                               stats[0], stats[1], n, eps, BLOCK=block,
                                               HAS_RESIDUAL=residual is not None, num_warps=warps)
    return total, y, stats


def _backward(x, weight, stats, dy, dsum, grad_params):
    """(dx `[tokens, h]`, d gamma, d beta) for the normalized input x; `dsum`, the gradient that
    reached x by another path (the residual stream), is added into dx. `grad_params`: gamma's
    and beta's parameters when their gradients go into their `main_grad`s (d gamma and d beta
    are then placeholders), else None."""
    n = x.shape[-1]
    x2d, dy2d = x.reshape(-1, n), dy.reshape(-1, n)
    dy2d = dy2d if dy2d.is_contiguous() else dy2d.contiguous()
    dsum2d = None if dsum is None else dsum.reshape(-1, n).contiguous()
    rows = x2d.shape[0]
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dx = torch.empty_like(x2d)
    partial = torch.empty(2, programs, n, dtype=torch.float32, device=x.device)  # gamma, beta
    block, warps = launch_config(n)
    _layernorm_backward_kernel[(programs,)](x2d, weight, dy2d, stats[0], stats[1],
                                            dx if dsum2d is None else dsum2d, dx, partial[0], partial[1],
                                            rows, n, ROWS=ROWS_PER_PROGRAM, BLOCK=block,
                                            HAS_DSUM=dsum2d is not None, num_warps=warps)
    w_param, b_param = grad_params or (None, None)
    return (dx, norm_grads.sum_partials(partial[0], weight, w_param),
            norm_grads.sum_partials(partial[1], weight, b_param))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, grad_params=None):
        _, y, stats = _forward(x, weight, bias, eps, None)
        ctx.save_for_backward(x, weight, stats)
        ctx.grad_params = grad_params
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        dx, dw, db = _backward(x, weight, stats, dy, None, ctx.grad_params)
        return dx.view(x.shape), dw, db, None, None


class _AddLayerNorm(torch.autograd.Function):
    """`(residual + h, LayerNorm(residual + h))` in one pass each way (as rmsnorm._AddRMSNorm)."""

    @staticmethod
    def forward(ctx, h, residual, weight, bias, eps, grad_params=None):
        total, y, stats = _forward(h, weight, bias, eps, residual)
        ctx.save_for_backward(total, weight, stats)
        ctx.grad_params = grad_params
        return total.view(h.shape), y.view(h.shape)

    @staticmethod
    def backward(ctx, dsum, dy):  # both materialized (zeros where unused)
        total, weight, stats = ctx.saved_tensors
        dx, dw, db = _backward(total, weight, stats, dy, dsum, ctx.grad_params)
        dx = dx.view(dy.shape)
        return dx, dx, dw, db, None, None


class _LayerNormKeep(torch.autograd.Function):
    """`(x, LayerNorm(x))` for an x that is also a residual (as rmsnorm._RMSNormKeep)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, grad_params=None):
        _, y, stats = _forward(x, weight, bias, eps, None)
        ctx.save_for_backward(x, weight, stats)
        ctx.grad_params = grad_params
        return x, y.view(x.shape)

    @staticmethod
    def backward(ctx, dresidual, dy):  # both materialized (zeros where unused)
        x, weight, stats = ctx.saved_tensors
        dx, dw, db = _backward(x, weight, stats, dy, dresidual, ctx.grad_params)
        return dx.view(x.shape), dw, db, None, None


def available(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the Triton kernels can take this call (as rmsnorm.available, with a bias)."""
    return (triton is not None and x.is_cuda and weight.dtype == bias.dtype == x.dtype
            and 0 < x.shape[-1] <= MAX_HIDDEN and weight.shape == bias.shape == x.shape[-1:])


def triton_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      grad_params=None) -> torch.Tensor:
    """`[.., h]` -> `[.., h]`: F.layer_norm over the last dim with gamma and beta (CUDA).
    `grad_params` (here and below): gamma's and beta's parameters, whose gradients then go
    into their `main_grad`s (fused/norm_grads.py); None for ordinary gradients."""
    if not available(x, weight, bias):
        raise RuntimeError("the Triton LayerNorm needs CUDA tensors of one dtype and Triton")
    return _LayerNorm.apply(x if x.is_contiguous() else x.contiguous(), weight.contiguous(),
                            bias.contiguous(), eps, grad_params)


def triton_add_layer_norm(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float, grad_params=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[.., h]` twice -> `(residual + h, triton_layer_norm(residual + h))`, h and the residual
    of one dtype and shape (CUDA)."""
    if not (available(h, weight, bias) and residual.dtype == h.dtype and residual.shape == h.shape):
        raise RuntimeError("the Triton LayerNorm needs CUDA tensors of one dtype and shape and Triton")
    return _AddLayerNorm.apply(h.contiguous(), residual.contiguous(), weight.contiguous(),
                               bias.contiguous(), eps, grad_params)


def triton_layer_norm_keep(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           grad_params=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[.., h]` -> `(x, triton_layer_norm(x))`, the residual gradient added in the norm's
    backward (CUDA)."""
    if not available(x, weight, bias):
        raise RuntimeError("the Triton LayerNorm needs CUDA tensors of one dtype and Triton")
    return _LayerNormKeep.apply(x if x.is_contiguous() else x.contiguous(), weight.contiguous(),
                                bias.contiguous(), eps, grad_params)

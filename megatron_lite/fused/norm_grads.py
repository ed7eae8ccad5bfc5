"""The Triton norms' gamma and beta gradients from their backward kernels' per-program partial
sums (`[programs, h]` fp32, fused/rmsnorm.py and fused/layernorm.py), summed by one small
Triton kernel: into the parameter's fp32 `main_grad` where gradient-accumulation fusion is on
(the protocol of tensor_parallel/layers.py: a placeholder gradient goes back to autograd and
`grad_added_to_main_grad` tells DDP's hook to drop it), else into a gradient of gamma's dtype.

Why a kernel of its own: ATen's column reduction of Llama-3.2-1B's `[512, 2048]` partials took
13 us per call on an H200 (4 MB read), 264 calls per step at 8 micro-batches; and the unfused
path then rounded the fp32 sum to bf16 and DDP's hook added it to `main_grad` by one more
kernel. The rows are summed in a fixed order (deterministic, as the ATen sum was).
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs don't have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None

# Columns per program: 2048 columns give 64 programs, each reading a [programs, 32] strip.
COLUMNS_PER_PROGRAM = 32
ROWS_PER_STEP = 64

if triton is not None:

    @triton.jit
    def _sum_partials_kernel(partial_ptr, out_ptr, n_rows, n_cols, ACCUMULATE: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            mask = (rows[:, None] < n_rows) & col_mask[None, :]
            acc += tl.load(partial_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask,
                           other=0.0)
        total = tl.sum(acc, 0)  # [BLOCK_N]
        if ACCUMULATE:
            total += tl.load(out_ptr + cols, mask=col_mask)
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)


def _launch(partial: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    rows, n = partial.shape
    grid = (triton.cdiv(n, COLUMNS_PER_PROGRAM),)
    _sum_partials_kernel[grid](partial, out, rows, n, ACCUMULATE=accumulate, BLOCK_R=ROWS_PER_STEP,
                               BLOCK_N=COLUMNS_PER_PROGRAM, num_warps=4)


def sum_partials(partial: torch.Tensor, like: torch.Tensor, param: torch.nn.Parameter | None) -> torch.Tensor:
    """`partial [programs, h]` (fp32, contiguous) summed over its rows. With `param` (fusion
    on: a DDP-managed parameter whose `main_grad` is `[h]` fp32) the sum is added to
    `param.main_grad` and a placeholder `like`-shaped gradient is returned; else the sum in
    `like`'s dtype, the gradient of the tensor `like` (gamma or beta as the kernel saw it)."""
    if param is not None:
        _launch(partial, param.main_grad.view(-1), accumulate=True)
        param.grad_added_to_main_grad = True
        return torch.empty_like(like)
    out = torch.empty(partial.shape[1], dtype=like.dtype, device=partial.device)  # [h]
    _launch(partial, out, accumulate=False)
    return out

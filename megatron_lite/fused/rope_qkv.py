"""RoPE (`--apply-rope-fusion`, spec §11) on the fused QKV projection's output, as two Triton
kernels on CUDA.

The QKV GEMM writes one row per token, `[q heads of group 0, k0, v0, q heads of group 1, ...]`
(spec §4.2). The compiled path (fused/elementwise.py `rotary`) rotates q and k as two strided
views, and its backward leaves two gradients that autograd joins with v's into the `[s, b, 3h]`
gradient of the GEMM's output by a `cat`: two rotation kernels plus a copy of the whole row
block per layer and micro-batch (about 50 us each at the Llama-3.2-1B shape on an H200, issue 13).
Here the forward reads each token's row once and writes the rotated q and k, v staying a view,
and the backward writes the whole QKV gradient in one pass, dq and dk rotated back, dv copied.

Only the rotate-half form over a whole head (`rotary_percent` 1, not interleaved) with a head
dim of twice a power of two is covered; anything else takes the compiled path. Arithmetic is
fp32 with one rounding per output, as Inductor's compiled reference does.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs don't have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None

if triton is not None:

    @triton.jit
    def _rope_qkv_forward_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, n_heads, per,
                                 HALF: tl.constexpr, HEADS: tl.constexpr):
        # One program per token: its row holds n_heads = groups * (per + 2) heads of 2 * HALF.
        tok = tl.program_id(0).to(tl.int64)
        head = tl.arange(0, HEADS)[:, None]  # [HEADS, 1]
        col = tl.arange(0, HALF)[None, :]  # [1, HALF]
        group, slot = head // (per + 2), head % (per + 2)  # slot < per: q; per: k; per + 1: v
        rotated = (head < n_heads) & (slot <= per)
        # cos/sin are cat(f, f) over the head dim: the first half serves both halves.
        cos = tl.load(cos_ptr + tok * 2 * HALF + col).to(tl.float32)  # [1, HALF]
        sin = tl.load(sin_ptr + tok * 2 * HALF + col).to(tl.float32)
        src = qkv_ptr + tok * n_heads * 2 * HALF + head * 2 * HALF + col
        x1 = tl.load(src, mask=rotated, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=rotated, other=0.0).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        n_groups = n_heads // (per + 2)
        is_q = rotated & (slot < per)
        q_dst = q_ptr + (tok * n_groups * per + group * per + slot) * 2 * HALF + col
        tl.store(q_dst, y1, mask=is_q)
        tl.store(q_dst + HALF, y2, mask=is_q)
        is_k = rotated & (slot == per)
        k_dst = k_ptr + (tok * n_groups + group) * 2 * HALF + col
        tl.store(k_dst, y1, mask=is_k)
        tl.store(k_dst + HALF, y2, mask=is_k)

    @triton.jit
    def _rope_qkv_backward_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, n_heads, per,
                                  HALF: tl.constexpr, HEADS: tl.constexpr):
        # The forward's transpose: y1 = x1 c - x2 s, y2 = x2 c + x1 s gives
        # dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s; v's slots copy dv.
        tok = tl.program_id(0).to(tl.int64)
        head = tl.arange(0, HEADS)[:, None]  # [HEADS, 1]
        col = tl.arange(0, HALF)[None, :]  # [1, HALF]
        group, slot = head // (per + 2), head % (per + 2)
        real = head < n_heads
        n_groups = n_heads // (per + 2)
        is_q, is_k, is_v = real & (slot < per), real & (slot == per), real & (slot == per + 1)
        q_src = dq_ptr + (tok * n_groups * per + group * per + slot) * 2 * HALF + col
        kv_off = (tok * n_groups + group) * 2 * HALF + col
        dy1 = tl.load(q_src, mask=is_q, other=0.0) + tl.load(dk_ptr + kv_off, mask=is_k, other=0.0)
        dy2 = (tl.load(q_src + HALF, mask=is_q, other=0.0)
               + tl.load(dk_ptr + kv_off + HALF, mask=is_k, other=0.0))
        dv1 = tl.load(dv_ptr + kv_off, mask=is_v, other=0.0)
        dv2 = tl.load(dv_ptr + kv_off + HALF, mask=is_v, other=0.0)
        cos = tl.load(cos_ptr + tok * 2 * HALF + col).to(tl.float32)  # [1, HALF]
        sin = tl.load(sin_ptr + tok * 2 * HALF + col).to(tl.float32)
        dy1, dy2 = dy1.to(tl.float32), dy2.to(tl.float32)
        dx1 = tl.where(is_v, dv1.to(tl.float32), dy1 * cos + dy2 * sin)
        dx2 = tl.where(is_v, dv2.to(tl.float32), dy2 * cos - dy1 * sin)
        dst = dqkv_ptr + tok * n_heads * 2 * HALF + head * 2 * HALF + col
        tl.store(dst, dx1.to(dqkv_ptr.dtype.element_ty), mask=real)
        tl.store(dst + HALF, dx2.to(dqkv_ptr.dtype.element_ty), mask=real)


def _num_warps(heads: int, half: int) -> int:
    # A program holds a [heads, half] tile of several fp32 tensors: 4 warps for Llama-3.2-1B's
    # 64 x 32 (measured), more for wider rows (Llama-3-8B's 64 x 64, 70B's 128 x 64) so that
    # a thread's share stays in registers instead of spilling.
    return min(16, max(4, heads * half // 512))


class _RopeQKV(torch.autograd.Function):
    """`[s, b, ng, (per + 2) * d]` -> q `[s, b, ng * per, d]`, k `[s, b, ng, d]` rotated (fresh,
    contiguous) and v `[s, b, ng, d]` (a view of the input)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, per):
        s, b, groups, width = qkv.shape
        d = width // (per + 2)
        n_heads = groups * (per + 2)
        q = qkv.new_empty(s, b, groups * per, d)  # [s, b, np/tp, d]
        k = qkv.new_empty(s, b, groups, d)  # [s, b, ng/tp, d]
        cos2, sin2 = cos.reshape(s * b, d), sin.reshape(s * b, d)  # [s*b, d], views of [s, b, 1, d]
        heads = triton.next_power_of_2(n_heads)
        _rope_qkv_forward_kernel[(s * b,)](qkv, cos2, sin2, q, k, n_heads, per, HALF=d // 2, HEADS=heads,
                                           num_warps=_num_warps(heads, d // 2))
        ctx.save_for_backward(cos2, sin2)
        ctx.per, ctx.shape, ctx.dtype = per, qkv.shape, qkv.dtype
        v = qkv.view(s, b, groups, per + 2, d)[:, :, :, per + 1]  # [s, b, ng/tp, d], strided
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos2, sin2 = ctx.saved_tensors
        s, b, groups, width = ctx.shape
        per = ctx.per
        d = width // (per + 2)
        # A gradient autograd never produced (e.g. v unused) arrives as None: zeros stand in.
        dq, dk, dv = (torch.zeros(s, b, n, d, dtype=ctx.dtype, device=cos2.device) if g is None
                      else g.contiguous() for g, n in ((dq, groups * per), (dk, groups), (dv, groups)))
        dqkv = torch.empty(ctx.shape, dtype=ctx.dtype, device=cos2.device)  # [s, b, ng/tp, (np/ng + 2) * d]
        n_heads = groups * (per + 2)
        heads = triton.next_power_of_2(n_heads)
        _rope_qkv_backward_kernel[(s * b,)](dq, dk, dv, cos2, sin2, dqkv, n_heads, per, HALF=d // 2,
                                            HEADS=heads, num_warps=_num_warps(heads, d // 2))
        return dqkv, None, None, None


def available(qkv: torch.Tensor, cos: torch.Tensor, per: int, interleaved: bool) -> bool:
    """Whether the kernels take this call: CUDA with Triton, rotate-half over whole heads whose
    half is a power of two, contiguous input and per-token tables `[s, b, 1, d]`."""
    if triton is None or not qkv.is_cuda or interleaved or qkv.dim() != 4:
        return False
    s, b, _, width = qkv.shape
    d = width // (per + 2)
    half = d // 2
    return (d * (per + 2) == width and cos.shape == (s, b, 1, d) and half > 0 and half & (half - 1) == 0
            and qkv.is_contiguous() and cos.is_contiguous())


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, per: int):
    """q, k rotated and v of the fused QKV output `[s, b, ng/tp, (per + 2) * d]` (per: query
    heads per group), cos/sin `[s, b, 1, d]` as models/rope.py builds them (not interleaved)."""
    if not available(qkv, cos, per, False) or sin.shape != cos.shape or not sin.is_contiguous():
        raise RuntimeError("the Triton RoPE on QKV needs CUDA, Triton, rotate-half tables [s, b, 1, d] "
                           "and a head dim of twice a power of two")
    return _RopeQKV.apply(qkv, cos, sin, per)

"""Attention on one (query block, key/value block) pair, returning the log-sum-exp of every
query row, and its backward given the *merged* output and LSE of the whole row.

Context-parallel attention (ring, all-gather, hierarchical) splits each query row's keys
over several blocks. A block's forward returns its partial output and LSE; the partials
merge exactly with log-sum-exp weights (`merge_`). In backward every block is given the
final output and LSE of the row, so its recomputed probabilities are the row's true softmax
restricted to the block and the per-block gradients sum to the exact gradient (the
FlashAttention-2 backward, Dao 2023, §3.1.2).

On CUDA with bf16/fp16 the blocks run PyTorch's own kernels (`torch.ops.aten` flash or cuDNN
attention, forward and backward): no `[s, s]` tensor, GQA K/V passed un-repeated (both
kernels take fewer K/V heads). Elsewhere (CPU tests, fp32, `--attention-backend unfused`)
an explicit fp32 math path with the same interface. The ops return LSE in different shapes
(flash `[b, h, s]`, cuDNN `[b, h, s, 1]`); `BlockKernel` always hands out `[b, h, s]` fp32.

Layout: q `[b, np, sq, d]`, k/v `[b, ng, sk, d]` (np a multiple of ng; query heads
`g*np/ng ... (g+1)*np/ng - 1` use K/V head g), out like q, lse `[b, np, sq]` fp32.
A causal block is square (sq == sk, same positions), masked above the diagonal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("math", "flash", "cudnn")


def select_backend(attention_backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The block kernel for `--attention-backend` on this device and dtype."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "math"
    if attention_backend in ("unfused", "local"):
        return "math"
    # auto -> cuDNN: on H200 (torch 2.11) Llama-1B at 32K tokens with full recompute ran
    # 1218 ms/step on cuDNN blocks and 1519 ms on flash (tools/benchmark.py, closing note).
    return "flash" if attention_backend == "flash" else "cudnn"


@dataclass(frozen=True)
class BlockKernel:
    backend: str  # one of BACKENDS
    scale: float  # softmax scale, 1/sqrt(d)
    dropout_p: float = 0.0  # attention dropout on the probabilities

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"block attention backend {self.backend!r} is not one of {BACKENDS}")

    def forward(self, q, k, v, causal: bool):
        """-> (out `[b, np, sq, d]` in q's dtype, lse `[b, np, sq]` fp32, rng). `rng` is what
        the backward needs to redraw this block's dropout mask (math: a seed, None without
        dropout; GPU ops: their philox state).

        Dropout acts elementwise on the row's probabilities; a block's probabilities are the
        row's times exp(block lse - row lse), so dropping within blocks and merging equals
        dropping the merged softmax, with one independent mask element per (query, key)."""
        p = self.dropout_p
        if self.backend == "math":
            seed = _draw_seed(q.device) if p else None
            out, lse = _math_forward(q, k, v, causal, self.scale, p, seed)
            return out, lse, seed
        # The GPU ops' rng outputs (philox state) are kept for every block: backward takes them
        # even without dropout.
        if self.backend == "flash":
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, causal, False,
                                                                     scale=self.scale)
            return res[0], res[1], (res[6], res[7])
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, p, causal, False,
                                                                 scale=self.scale)
        return res[0], res[1].reshape(res[1].shape[:3]), (res[6], res[7])  # lse [b, np, sq, 1]

    def backward(self, dout, q, k, v, out, lse, causal: bool, rng=None):
        """Gradients of one block given the row-merged `out` and `lse` and the block's `rng`
        from forward: (dq, dk, dv) shaped like q, k, v (dk/dv summed over the query heads that
        share a K/V head)."""
        p = self.dropout_p
        if self.backend == "math":
            return _math_backward(dout, q, k, v, out, lse, causal, self.scale, p, rng)
        sq, sk = q.shape[2], k.shape[2]
        # None = an undefined tensor: no cu_seqlens (dense batch), no bias, no dropout state.
        seed, offset = rng if rng is not None else (None, None)
        lse = lse.contiguous()
        if self.backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, None, None, sq, sk, p, causal, seed, offset, scale=self.scale)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, None, None, sq, sk, p, causal,
            scale=self.scale)


def _draw_seed(device) -> int:
    """A seed for one block's dropout mask, from the current default generator (the TP-rank
    stream inside the model's RNG fork; replayed by activation recompute)."""
    return int(torch.randint(2**62, (1,), device="cpu" if torch.device(device).type == "cpu" else device))


def _dropout_scale(shape, p: float, seed: int, device) -> torch.Tensor:
    """Keep-mask divided by the keep probability, fp32 `shape`, redrawn identically from `seed`."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.rand(shape, generator=g, device=device) >= p).float() / (1.0 - p)


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's partial attention into the running result, in place.
    out `[b, np, s, d]` fp32, lse `[b, np, s]` fp32 (views allowed); every row of `lse` must
    already be finite (the first block of a row covers it)."""
    new = torch.logaddexp(lse, block_lse)  # [b, np, s]
    out.mul_((lse - new).exp_().unsqueeze(-1))
    out.add_(block_out.float() * (block_lse - new).exp_().unsqueeze(-1))
    lse.copy_(new)


def _grouped(q, k, v):
    """fp32 views with the query heads grouped by their K/V head: q `[b, ng, np/ng, sq, d]`,
    k/v `[b, ng, 1, sk, d]` (broadcast over the group, never repeated in memory)."""
    b, n_heads, sq, d = q.shape
    n_groups = k.shape[1]
    qg = q.float().reshape(b, n_groups, n_heads // n_groups, sq, d)
    return qg, k.float().unsqueeze(2), v.float().unsqueeze(2)


def _scores(qg, kg, causal: bool, scale: float) -> torch.Tensor:
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [b, ng, np/ng, sq, sk]
    if causal:
        sq, sk = scores.shape[-2:]
        if sq != sk:
            raise ValueError(f"a causal block must be square, got {sq} queries x {sk} keys")
        above = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores


def _math_forward(q, k, v, causal: bool, scale: float, dropout_p: float = 0.0, seed: int | None = None):
    qg, kg, vg = _grouped(q, k, v)
    scores = _scores(qg, kg, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)  # [b, ng, np/ng, sq]
    probs = (scores - lse.unsqueeze(-1)).exp()  # [b, ng, np/ng, sq, sk]
    if dropout_p:
        probs = probs * _dropout_scale(probs.shape, dropout_p, seed, q.device)
    out = torch.matmul(probs, vg)  # [b, ng, np/ng, sq, d]
    return out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:3])


def _math_backward(dout, q, k, v, out, lse, causal: bool, scale: float, dropout_p: float = 0.0,
                   seed: int | None = None):
    qg, kg, vg = _grouped(q, k, v)
    grouped = qg.shape  # [b, ng, np/ng, sq, d]
    probs = (_scores(qg, kg, causal, scale) - lse.float().reshape(grouped[:4]).unsqueeze(-1)).exp()
    keep = _dropout_scale(probs.shape, dropout_p, seed, q.device) if dropout_p else None
    dog = dout.float().reshape(grouped)
    dropped = probs * keep if keep is not None else probs
    dv = torch.matmul(dropped.transpose(-1, -2), dog).sum(2)  # [b, ng, sk, d]
    dprobs = torch.matmul(dog, vg.transpose(-1, -2))  # [b, ng, np/ng, sq, sk]
    if keep is not None:
        dprobs = dprobs * keep
    # rowsum(dO * O) = rowsum(P * dP) with the dropped output as well (FlashAttention-2 §3.1.2).
    row = (dog * out.float().reshape(grouped)).sum(-1, keepdim=True)  # [b, ng, np/ng, sq, 1]
    dscores = probs * (dprobs - row) * scale
    dq = torch.matmul(dscores, kg)  # [b, ng, np/ng, sq, d]
    dk = torch.matmul(dscores.transpose(-1, -2), qg).sum(2)  # [b, ng, sk, d]
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

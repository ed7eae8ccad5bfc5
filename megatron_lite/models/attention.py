"""Self-attention: fused QKV projection, RoPE, core attention (SDPA or an explicit
reference), output projection. Heads are split across tensor-parallel ranks."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_lite.config.configs import ModelConfig
from megatron_lite.context_parallel import ContextParallelAttention, stashed_local_attention
from megatron_lite.context_parallel.core import OFF, AttentionStash
from megatron_lite.context_parallel.ulysses import check_heads
from megatron_lite.fused.elementwise import rotary
from megatron_lite.fused.rope_qkv import available as rope_qkv_available
from megatron_lite.fused.rope_qkv import rope_qkv
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

_SDPA_BACKENDS = ("auto", "flash", "fused")
_REFERENCE_BACKENDS = ("unfused", "local")


def _sdpa_context(backend: str):
    """Pin SDPA to one kernel when the user asked for one (flash / cuDNN); `auto` lets torch pick."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = SDPBackend.FLASH_ATTENTION if backend == "flash" else SDPBackend.CUDNN_ATTENTION
    return sdpa_kernel([kernel])


def core_attention(q, k, v, *, backend: str, dropout_p: float, softmax_in_fp32: bool):
    """Causal attention. q `[s, b, np, d]`, k/v `[s, b, ng, d]` -> `[s, b, np*d]`.

    The SDPA path never materializes `[s, s]` scores on the GPU (flash / cuDNN / efficient
    kernels). The reference path is the textbook computation, kept for testing and debugging.
    """
    s, b, n_heads, d = q.shape
    n_groups = k.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    if backend in _SDPA_BACKENDS:
        with _sdpa_context(backend):
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=n_groups != n_heads
            )  # [b, np, s, d]
    elif backend in _REFERENCE_BACKENDS:
        out = _reference_attention(q, k, v, dropout_p, softmax_in_fp32)
    else:
        raise ValueError(f"--attention-backend {backend!r} is not one of "
                         f"{_SDPA_BACKENDS + _REFERENCE_BACKENDS}")
    return out.permute(2, 0, 1, 3).reshape(s, b, n_heads * d)  # [s, b, np*d]


def _reference_attention(q, k, v, dropout_p: float, softmax_in_fp32: bool):
    n_heads, n_groups = q.shape[1], k.shape[1]
    if n_groups != n_heads:  # GQA: each KV head serves n_heads/n_groups consecutive query heads
        k = k.repeat_interleave(n_heads // n_groups, dim=1)
        v = v.repeat_interleave(n_heads // n_groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [b, np, s, s]
    if softmax_in_fp32:
        scores = scores.float()
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1).to(v.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)  # [b, np, s, d]


def context_parallel_attention(config: ModelConfig, ps, layer_number: int) -> ContextParallelAttention | None:
    """The CP attention of layer `layer_number` (1-based), or None without CP."""
    if ps.cp_size == 1:
        return None
    types = config.cp_comm_type
    comm_type = types[layer_number - 1] if len(types) > 1 else types[0]
    comm_type = "all_gather" if comm_type == "allgather" else comm_type
    # a2a+p2p: the all-to-all runs inside the inner groups (ParallelState builds them from
    # --hierarchical-context-parallel-sizes), the ring across them.
    inner = ps.cp_comm("cp-inner") if comm_type == "a2a+p2p" and "cp-inner" in ps.ranks else None
    outer = ps.cp_comm("cp-outer") if inner is not None else None
    if comm_type in ("a2a", "a2a+p2p"):
        check_heads(config.num_attention_heads // ps.tp_size, config.num_query_groups // ps.tp_size,
                    inner.size if inner is not None else ps.cp_size, f"--cp-comm-type {comm_type}")
    return ContextParallelAttention(comm_type, ps.cp_comm(), config.attention_backend, inner, outer)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, ps, rng_tracker=None, device=None, layer_number: int = 1):
        super().__init__()
        tp = ps.tp_size
        if config.num_attention_heads % tp:
            raise ValueError(f"--num-attention-heads ({config.num_attention_heads}) must be divisible "
                             f"by --tensor-model-parallel-size ({tp})")
        if config.num_query_groups % tp:
            raise ValueError(f"--num-query-groups ({config.num_query_groups}) must be a multiple of "
                             f"--tensor-model-parallel-size ({tp}): each TP rank needs whole KV heads")
        self.config, self.rng_tracker = config, rng_tracker
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.local_groups = config.num_query_groups // tp
        d = config.kv_channels
        # Fused QKV rows grouped per query group: [q heads of g0, k0, v0, q heads of g1, ...]
        # (spec §4.2), so a contiguous TP shard holds whole groups.
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, config.query_projection_size + 2 * config.kv_projection_size,
            tp_group=ps.tp_group, bias=config.add_bias_linear or config.add_qkv_bias,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype, device=device,
            gradient_accumulation_fusion=config.gradient_accumulation_fusion,
            tp_comm_overlap=config.tp_comm_overlap, alternating=True)
        self.linear_proj = RowParallelLinear(
            config.query_projection_size, config.hidden_size, tp_group=ps.tp_group,
            bias=config.add_bias_linear, input_is_parallel=True,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype, device=device,
            gradient_accumulation_fusion=config.gradient_accumulation_fusion,
            tp_comm_overlap=config.tp_comm_overlap, alternating=True)
        self.head_dim = d
        self.context_parallel = context_parallel_attention(config, ps, layer_number)
        # Set to record / replay by the transformer block around full-recompute checkpoints.
        self.stash = AttentionStash()

    def _split_and_rotate(self, qkv: torch.Tensor, rope):
        """q `[s, b, np/tp, d]`, k and v `[s, b, ng/tp, d]` of `qkv` `[s, b, ng/tp, (np/ng + 2) * d]`,
        q and k rotated when `rope` (cos, sin `[s, b, 1, d]`) is given."""
        cfg, s, b = self.config, qkv.shape[0], qkv.shape[1]
        d, per = self.head_dim, self.heads_per_group
        if rope is not None and cfg.apply_rope_fusion and rope_qkv_available(
                qkv, rope[0], per, cfg.rotary_interleaved):
            return rope_qkv(qkv, *rope, per)  # one pass each way over qkv (fused/rope_qkv.py)
        q, k, v = qkv.split([per * d, d, d], dim=-1)  # q: [s, b, ng/tp, np/ng * d], strided
        if rope is None:
            return q.reshape(s, b, self.local_groups * per, d), k, v  # [s, b, np/tp, d] (a copy with GQA)
        cos, sin = rope  # [s, b, 1, d]
        rot = rotary if cfg.apply_rope_fusion else rotary.reference
        # Rotated as a view [s, b, ng/tp, np/ng, d] of the strided q: the rotation writes a
        # fresh contiguous tensor anyway, so reshaping q to heads first would copy it once
        # more (a [s, b, np/tp, d] copy per layer and micro-batch).
        q = rot(q.view(s, b, self.local_groups, per, d), cos.unsqueeze(2), sin.unsqueeze(2),
                cfg.rotary_interleaved).reshape(s, b, self.local_groups * per, d)  # [s, b, np/tp, d]
        return q, rot(k, cos, sin, cfg.rotary_interleaved), v

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        cfg = self.config
        qkv = self.linear_qkv(x)  # [s, b, ng/tp * (np/ng + 2) * d]
        s, b = qkv.shape[:2]
        d, per = self.head_dim, self.heads_per_group
        qkv = qkv.view(s, b, self.local_groups, (per + 2) * d)  # [s, b, ng/tp, (np/ng + 2) * d]
        q, k, v = self._split_and_rotate(qkv, rope)
        dropout_p = cfg.attention_dropout if self.training else 0.0
        attend = lambda q_, k_, v_: core_attention(  # noqa: E731
            q_, k_, v_, backend=cfg.attention_backend, dropout_p=dropout_p,
            softmax_in_fp32=cfg.attention_softmax_in_fp32)
        # Without CP and with dropout the ordinary kernel stays (its dropout stream is what a
        # run without recompute draws); the block kernels' own dropout is used under CP only.
        stash = self.stash if self.stash.mode != OFF and (self.context_parallel or not dropout_p) else None
        if self.context_parallel is not None:  # [s/cp, b, heads, d]: attention across CP ranks
            local, cp = attend, self.context_parallel
            attend = lambda q_, k_, v_: cp(q_, k_, v_, local, dropout_p, stash)  # noqa: E731
        elif stash is not None:  # full recompute: one LSE block whose output the recompute reuses
            attend = stashed_local_attention(cfg.attention_backend, dropout_p, stash)
        # Attention dropout acts on this rank's heads only: draw it from the TP-rank stream.
        fork = (self.rng_tracker.fork() if dropout_p and self.rng_tracker is not None
                else contextlib.nullcontext())
        with fork:
            if cfg.recompute_granularity == "selective" and self.training:
                # Recompute the core attention in backward (its activations are O(s^2) without
                # flash); checkpoint restores the forked RNG state so dropout repeats exactly.
                ctx = checkpoint(attend, q, k, v, use_reentrant=False)
            else:
                ctx = attend(q, k, v)  # [s, b, np/tp * d]
        return self.linear_proj(ctx)  # [s, b, h] (or [s/tp, b, h] with SP)

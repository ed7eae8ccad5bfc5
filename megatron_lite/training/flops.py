"""Model FLOPs per global batch (spec §3.9), for TFLOP/s/GPU and MFU."""
from __future__ import annotations

from megatron_lite.config.configs import ModelConfig


def num_floating_point_operations(cfg: ModelConfig, global_batch_size: int, seq_length: int) -> float:
    """Forward + backward model FLOPs of one global batch (recomputation not counted)."""
    L, h, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    Q, K = cfg.query_projection_size, cfg.kv_projection_size
    gated = 3 if cfg.swiglu else 2  # GEMM widths of the MLP's first projection(s) + second
    per_token = (6 * L * h * cfg.ffn_hidden_size * gated
                 + 6 * L * (h * (Q + 2 * K) + Q * h)
                 + 6 * h * V)
    # Causal attention: QK^T and PV, halved by the mask, x3 for forward + backward.
    attention = global_batch_size * seq_length**2 * L * 6 * Q
    return global_batch_size * seq_length * per_token + attention

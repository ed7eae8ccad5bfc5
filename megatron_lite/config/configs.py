"""Frozen configuration dataclasses built once from the argparse namespace.

Library code takes these (DESIGN rule 2): only `config/`, entry points and `pretrain()` read
`args`. Field names follow Megatron's argument names where one exists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # padded (spec §3.7)
    max_position_embeddings: int
    ffn_hidden_size: int | None = None
    kv_channels: int | None = None
    num_query_groups: int | None = None  # None = no GQA (one KV head per query head)
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | none
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    rotary_seq_len_interpolation_factor: float | None = None
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    norm_epsilon: float = 1e-5
    apply_layernorm_1p: bool = False
    swiglu: bool = False
    squared_relu: bool = False  # relu(x)^2 instead of GeLU (--squared-relu)
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    untie_embeddings_and_output_weights: bool = False
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_method_std: float = 0.02
    embedding_init_method_std: float | None = None  # embedding tables' std; None: init_method_std
    fp32_residual_connection: bool = False
    attention_backend: str = "auto"  # auto | flash | fused | unfused | local
    attention_softmax_in_fp32: bool = False
    recompute_granularity: str | None = None  # None | selective | full
    recompute_method: str | None = None  # uniform | block
    recompute_num_layers: int | None = None
    # Full recompute keeps each layer's attention output and LSE so the recompute skips the
    # attention forward (context_parallel/core.py); False re-runs it (for measurements).
    recompute_keeps_attention: bool = True
    sequence_parallel: bool = False
    # --cp-comm-type: one value for every layer or one per layer (spec §9.2); used when the
    # ParallelState has CP > 1.
    cp_comm_type: tuple[str, ...] = ("p2p",)
    label_smoothing: float = 0.0
    # Fusions (Megatron's flag names; spec §10 "Fusion switches"). On CUDA SwiGLU, RoPE and
    # RMSNorm compile their PyTorch reference (fused/elementwise.py); the cross entropy is a
    # Triton kernel. (--no-bias-gelu-fusion changes nothing: config/accepted_as_is.py.)
    bias_swiglu_fusion: bool = True
    apply_rope_fusion: bool = True
    no_persist_layer_norm: bool = False  # True: RMSNorm unfused
    cross_entropy_loss_fusion: bool = False
    # --no-gradient-accumulation-fusion turns off: linear-layer weight gradients accumulate
    # straight into the DDP main_grad buffer (fused/wgrad.py); on by default as in Megatron.
    gradient_accumulation_fusion: bool = True
    # --tp-comm-overlap (needs sequence parallelism): the SP all-gather and reduce-scatter of
    # the linear layers as ring collective matmuls (tensor_parallel/overlap.py).
    tp_comm_overlap: bool = False
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        # Derived defaults exactly as Megatron's validation derives them (spec §10).
        if self.ffn_hidden_size is None:
            ffn = int(8 * self.hidden_size / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size
            object.__setattr__(self, "ffn_hidden_size", ffn)
        if self.kv_channels is None:
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
                f"--num-query-groups ({self.num_query_groups})"
            )

    @property
    def query_projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def kv_projection_size(self) -> int:
        return self.kv_channels * self.num_query_groups

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def model_config_from_args(args) -> ModelConfig:
    """Pick the ModelConfig fields out of a validated namespace (needs `padded_vocab_size`)."""
    values = {name: getattr(args, name) for name in _MODEL_FIELDS if hasattr(args, name)}
    values["vocab_size"] = args.padded_vocab_size
    if not getattr(args, "group_query_attention", False):
        values["num_query_groups"] = None
    values["add_bias_linear"] = getattr(args, "add_bias_linear", True)
    values["cp_comm_type"] = tuple(getattr(args, "cp_comm_type", None) or ("p2p",))
    return ModelConfig(**values)

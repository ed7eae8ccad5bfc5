"""Feed-forward block: GeLU MLP (GPT), squared-ReLU MLP or SwiGLU (Llama), column- then
row-parallel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config.configs import ModelConfig
from megatron_lite.fused.elementwise import gelu, swiglu
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ps, device=None):
        super().__init__()
        self.swiglu, self.swiglu_fusion = config.swiglu, config.bias_swiglu_fusion
        self.squared_relu = config.squared_relu
        ffn = config.ffn_hidden_size
        # SwiGLU: fc1 holds [gate; up] globally; stride 2 gives each TP rank [gate_i; up_i].
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size, 2 * ffn if self.swiglu else ffn, tp_group=ps.tp_group,
            bias=config.add_bias_linear, sequence_parallel=config.sequence_parallel,
            partition_stride=2 if self.swiglu else 1, params_dtype=config.params_dtype, device=device,
            gradient_accumulation_fusion=config.gradient_accumulation_fusion,
            tp_comm_overlap=config.tp_comm_overlap, alternating=True)
        self.linear_fc2 = RowParallelLinear(
            ffn, config.hidden_size, tp_group=ps.tp_group, bias=config.add_bias_linear,
            input_is_parallel=True, sequence_parallel=config.sequence_parallel,
            params_dtype=config.params_dtype, device=device,
            gradient_accumulation_fusion=config.gradient_accumulation_fusion,
            tp_comm_overlap=config.tp_comm_overlap, alternating=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)  # [s, b, ffn/tp] (x2 for SwiGLU)
        if self.swiglu:
            h = swiglu(h) if self.swiglu_fusion else swiglu.reference(h)  # [s, b, ffn/tp]
        elif self.squared_relu:
            h = F.relu(h).pow(2)  # Megatron-LM's squared_relu (--squared-relu)
        else:
            h = gelu(h)  # tanh-approximate, what Megatron's fused bias-GeLU computes (spec §11)
        return self.linear_fc2(h)  # [s, b, h] (or [s/tp, b, h] with SP)

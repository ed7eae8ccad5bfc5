"""LayerNorm and RMSNorm over the hidden dimension, with Megatron's zero-centred gamma option."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.fused.elementwise import rms_norm
from megatron_lite.fused.layernorm import available as layer_norm_kernel_available
from megatron_lite.fused.layernorm import triton_add_layer_norm, triton_layer_norm, triton_layer_norm_keep
from megatron_lite.fused.rmsnorm import available as rms_norm_kernel_available
from megatron_lite.fused.rmsnorm import triton_add_rms_norm, triton_rms_norm, triton_rms_norm_keep
from megatron_lite.tensor_parallel.layers import accumulates_in_main_grad
from megatron_lite.tensor_parallel.sharding import mark_sequence_parallel


class Norm(nn.Module):
    """`y = norm(x) * gamma (+ beta)`; `apply_layernorm_1p` stores gamma - 1 (init zeros), which
    keeps weight decay pulling gamma towards 1 instead of 0 (spec §11)."""

    def __init__(self, hidden_size: int, kind: str = "LayerNorm", eps: float = 1e-5,
                 zero_centered: bool = False, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, fused: bool = True,
                 gradient_accumulation_fusion: bool = False):
        super().__init__()
        if kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization {kind!r} is not supported (LayerNorm or RMSNorm)")
        self.kind, self.eps, self.zero_centered, self.fused = kind, eps, zero_centered, fused
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        self.shape = (hidden_size,)
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
                     if kind == "LayerNorm" else None)
        for p in self.parameters():
            # Under sequence parallelism each TP rank sees different tokens: grads need a TP sum.
            if sequence_parallel:
                mark_sequence_parallel(p)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.zero_centered else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h] -> [s, b, h]
        weight = self.weight + 1 if self.zero_centered else self.weight
        weight = weight.to(x.dtype)
        if self.kind == "LayerNorm":
            bias = self.bias.to(x.dtype)
            if self.fused and layer_norm_kernel_available(x, weight, bias):
                return triton_layer_norm(x, weight, bias, self.eps, self.grad_params())
            return F.layer_norm(x, self.shape, weight, bias, self.eps)
        # RMSNorm statistics in fp32 (as TE and HF Llama do), output in the input dtype.
        if self.fused and rms_norm_kernel_available(x, weight):
            return triton_rms_norm(x, weight, self.eps, self._gamma_grad_param())
        if self.fused:  # Inductor's compiled reference (rows too wide for the Triton kernels)
            return rms_norm(x, weight, self.eps)
        return rms_norm.reference(x, weight, self.eps)

    def grad_params(self):
        """(gamma, beta) parameters (beta None for RMSNorm) whose gradients the Triton kernels
        add straight into their fp32 `main_grad`s (fused/norm_grads.py), as the linears' GEMMs
        do under gradient-accumulation fusion; None where the gradients go to autograd (the
        fusion off, no DDP grad buffer, no grad mode)."""
        params = [p for p in (self.weight, self.bias) if p is not None]
        if not (self.gradient_accumulation_fusion and all(accumulates_in_main_grad(p) for p in params)):
            return None
        return self.weight, self.bias

    def _gamma_grad_param(self):
        params = self.grad_params()
        return None if params is None else params[0]

    def keep_and_norm(self, x: torch.Tensor):
        """`(x, self(x))`, `[s, b, h]` each, where x is also a residual: the backward adds the
        gradient reaching x through the residual into the norm's dx in the norm's kernel, where
        the fused norms run; None elsewhere (the caller uses x and self(x))."""
        if not self.fused:
            return None
        weight = (self.weight + 1 if self.zero_centered else self.weight).to(x.dtype)
        if self.kind == "LayerNorm":
            bias = self.bias.to(x.dtype)
            if layer_norm_kernel_available(x, weight, bias):
                return triton_layer_norm_keep(x, weight, bias, self.eps, self.grad_params())
        elif rms_norm_kernel_available(x, weight):
            return triton_rms_norm_keep(x, weight, self.eps, self._gamma_grad_param())
        return None

    def add_and_norm(self, h: torch.Tensor, residual: torch.Tensor):
        """`(residual + h, self(residual + h))`, `[s, b, h]` each, by one kernel each way where
        the fused norms run (CUDA, Triton, h and the residual of one dtype and shape): the sum
        is not read back for the norm, nor its gradient added by a kernel of its own. None
        elsewhere, for the caller to add and normalize separately."""
        if not self.fused or h.dtype != residual.dtype or h.shape != residual.shape:
            return None
        weight = (self.weight + 1 if self.zero_centered else self.weight).to(residual.dtype)
        if self.kind == "LayerNorm":
            bias = self.bias.to(residual.dtype)
            if layer_norm_kernel_available(residual, weight, bias):
                return triton_add_layer_norm(h, residual, weight, bias, self.eps, self.grad_params())
        elif rms_norm_kernel_available(residual, weight):
            return triton_add_rms_norm(h, residual, weight, self.eps, self._gamma_grad_param())
        return None

"""Fused elementwise ops of the transformer layer (Megatron's bias-SwiGLU, bias-GeLU, RoPE and
RMSNorm fusions, spec §11), each defined once as its PyTorch reference and compiled on CUDA by
`jit_fuser` (GeLU excepted: one eager kernel already; SwiGLU and RMSNorm: Triton kernels of
their own). The model calls the unfused reference when a `--no-*-fusion` flag asks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.fused.jit import jit_fuser
from megatron_lite.fused.rmsnorm import available as rms_norm_kernel_available
from megatron_lite.fused.rmsnorm import triton_rms_norm
from megatron_lite.fused.swiglu import available as swiglu_kernel_available
from megatron_lite.fused.swiglu import triton_swiglu
from megatron_lite.models.rope import apply_rotary


def _swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """`[.., 2f]` -> `[.., f]`: silu(gate) * up, with h = [gate | up] on the last dim."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`_swiglu_reference` by the Triton kernels of fused/swiglu.py on CUDA (Inductor's
    compiled backward reads its inputs twice), eagerly elsewhere."""
    return triton_swiglu(h) if swiglu_kernel_available(h) else _swiglu_reference(h)


swiglu.reference = _swiglu_reference


def gelu(h: torch.Tensor) -> torch.Tensor:
    """tanh-approximate GeLU: what Megatron's fused bias-GeLU computes (spec §11); the bias is
    already added by the column-parallel linear's GEMM epilogue.

    Not compiled, unlike its neighbours: eager `F.gelu` is already one kernel forward and one
    backward, which is all Inductor makes of it, while a compiled call costs its guards and
    runtime wrappers on the host, forward and backward (~340 us per layer and micro-batch
    profiled on an H200 host, issue 13), which a tensor-parallel step cannot hide."""
    return F.gelu(h, approximate="tanh")


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics, output in x's dtype times gamma."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


_compiled_rms_norm = jit_fuser(_rms_norm_reference)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`_rms_norm_reference` by the Triton kernels of fused/rmsnorm.py on CUDA (Inductor's
    split it into more kernels and passes), compiled for rows too wide for them, eagerly on
    the CPU."""
    if rms_norm_kernel_available(x, weight):
        return triton_rms_norm(x, weight, eps)
    return _compiled_rms_norm(x, weight, eps)


rms_norm.reference = _rms_norm_reference


@jit_fuser
def rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return apply_rotary(t, cos, sin, interleaved)

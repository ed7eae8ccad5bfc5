"""`jit_fuser`: run a small elementwise function through torch.compile on CUDA tensors.

Megatron fuses bias-SwiGLU, RoPE and norms with jit-scripted or TE kernels; torch.compile
(Inductor/Triton) generates equivalent fused kernels from the PyTorch reference itself, so
the reference and the fused op can never drift apart. CPU tensors (tests, CPU training)
always take the eager reference: compiling there costs seconds and buys nothing.
"""
from __future__ import annotations

import functools

import torch


def jit_fuser(fn):
    """Decorator: `fn.reference` is the eager function; calls on CUDA tensors are compiled
    (lazily, at their first call; one graph per input shape/dtype)."""
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args, **kwargs):
        if x.is_cuda:
            return compiled(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    dispatch.reference = fn
    return dispatch

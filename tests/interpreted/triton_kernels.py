"""Runs megatron_lite's Triton kernels on CPU tensors under Triton's interpreter and prints, as
one JSON object, each case's largest error relative to its fp64 PyTorch reference (outputs and
every gradient). Run by tests/unit/test_triton_interpreted.py in a process of its own, since
TRITON_INTERPRET must be set before Triton is imported."""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_lite.fused.cross_entropy import _FusedCrossEntropy  # noqa: E402
from megatron_lite.fused.elementwise import _rms_norm_reference, _swiglu_reference  # noqa: E402
from megatron_lite.fused.layernorm import _LayerNorm  # noqa: E402
from megatron_lite.fused.rmsnorm import _RMSNorm  # noqa: E402
from megatron_lite.fused.swiglu import _SwiGLU  # noqa: E402
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _forward_backward(fn, *inputs):
    """(output, input gradients) for an output gradient drawn the same way in any dtype."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def _relative_errors(got, want) -> float:
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max().clamp(min=1e-30)).item()
               for g, w in zip(got, want))


def _cases():
    g = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        for shape in [(6, 2, 2 * 100), (3, 2 * 1030)]:
            h = (torch.randn(*shape, generator=g) * 3).to(dtype)
            yield (f"swiglu {name} {shape}", _forward_backward(_SwiGLU.apply, h),
                   _forward_backward(_swiglu_reference, h.double()))
        for shape in [(7, 3, 100), (5, 2048), (40, 64)]:  # rows above and below a program's 16
            x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
            w = (torch.rand(shape[-1], generator=g) * 2).to(dtype)
            yield (f"rmsnorm {name} {shape}",
                   _forward_backward(lambda a, b: _RMSNorm.apply(a, b, 1e-5), x, w),
                   _forward_backward(lambda a, b: _rms_norm_reference(a, b, 1e-5), x.double(), w.double()))
            b = torch.randn(shape[-1], generator=g).to(dtype)
            yield (f"layernorm {name} {shape}",
                   _forward_backward(lambda a, c, d: _LayerNorm.apply(a, c, d, 1e-5), x, w, b),
                   _forward_backward(lambda a, c, d: F.layer_norm(a, a.shape[-1:], c, d, 1e-5),
                                     x.double(), w.double(), b.double()))
        for smoothing in (0.0, 0.1):
            logits = (torch.randn(9, 2, 5003, generator=g) * 3).to(dtype)  # V not a block multiple
            target = torch.randint(0, 5003, (9, 2), generator=g)
            fused = lambda x, t=target, s=smoothing: _FusedCrossEntropy.apply(x, t, None, s)  # noqa: E731
            ref = lambda x, t=target, s=smoothing: vocab_parallel_cross_entropy(x, t, None, s)  # noqa: E731
            yield (f"cross_entropy {name} smoothing {smoothing}", _forward_backward(fused, logits),
                   _forward_backward(ref, logits.double()))


def main() -> None:
    print(json.dumps({name: _relative_errors(got, want) for name, got, want in _cases()}))


if __name__ == "__main__":
    main()

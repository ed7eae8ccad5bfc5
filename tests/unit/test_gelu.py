"""The GPT MLP's GeLU is the tanh approximation that Megatron's fused bias-GeLU computes
(spec §11), value and gradient; --no-bias-gelu-fusion leaves it so (config/accepted_as_is.py)."""
import math

import torch

from megatron_lite.fused.elementwise import gelu


def _megatron_bias_gelu(x: torch.Tensor) -> torch.Tensor:
    # Megatron-LM fused_bias_gelu.bias_gelu with the bias already added, in float64
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def test_gelu_is_megatrons_tanh_approximation_value_and_gradient():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    y = gelu(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = _megatron_bias_gelu(ref_x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-8)  # 0.79788456 ~ sqrt(2/pi) to 1e-9
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-7)
    exact = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # erf GeLU at 1: differs from tanh's
    assert abs(gelu(torch.tensor(1.0, dtype=torch.float64)).item() - exact) > 1e-5

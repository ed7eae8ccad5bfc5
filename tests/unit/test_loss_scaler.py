"""The dynamic loss scaler walks the state machine of spec §7.2, and the optimizer skips a step
with an overflowing gradient without touching the parameters."""
import pytest
import torch

from megatron_lite.optimizer.core import OptimizerConfig, OptimizerStepResult
from megatron_lite.optimizer.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer


def _walk(scaler, steps: str):
    """'o' = overflow, '.' = clean step; returns the scale after each step."""
    out = []
    for s in steps:
        scaler.update(s == "o")
        out.append(scaler.scale)
    return out


def test_first_overflow_spends_hysteresis_then_each_overflow_halves():
    s = DynamicLossScaler(initial_scale=2.0**32, hysteresis=2, window=1000)
    assert _walk(s, "ooo") == [2.0**32, 2.0**31, 2.0**30]
    assert (s.growth_tracker, s.hysteresis_tracker) == (0, -1)


def test_clean_steps_do_not_refill_hysteresis():
    s = DynamicLossScaler(initial_scale=1024.0, hysteresis=2, window=1000)
    # One overflow spends a credit; clean steps in between leave it spent, so the next
    # overflow halves at once.
    assert _walk(s, "o....o") == [1024.0] * 5 + [512.0]


def test_growth_after_a_window_of_clean_steps_refills_hysteresis():
    s = DynamicLossScaler(initial_scale=1024.0, hysteresis=2, window=3)
    assert _walk(s, "oo") == [1024.0, 512.0]
    assert _walk(s, "...") == [512.0, 512.0, 1024.0]
    assert (s.growth_tracker, s.hysteresis_tracker) == (0, 2)
    assert _walk(s, "o") == [1024.0]  # the refilled credit absorbs one overflow again


def test_overflow_resets_the_growth_window():
    s = DynamicLossScaler(initial_scale=64.0, hysteresis=5, window=3)
    assert _walk(s, "..o..") == [64.0] * 5  # two clean, overflow (credit spent), two clean
    assert _walk(s, ".") == [128.0]  # the third clean step since the overflow grows


def test_scale_never_drops_below_the_minimum():
    s = DynamicLossScaler(initial_scale=8.0, min_scale=2.0, hysteresis=1, window=1000)
    assert _walk(s, "oooo") == [4.0, 2.0, 2.0, 2.0]


def test_state_dict_round_trip_and_constant_scaler():
    s = DynamicLossScaler(initial_scale=16.0, hysteresis=3, window=4)
    _walk(s, "o..")
    t = DynamicLossScaler()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.growth_tracker, t.hysteresis_tracker) == (16.0, 2, 2)
    c = ConstantLossScaler(4096.0)
    assert _walk(c, "o.o") == [4096.0] * 3


class _PS:
    tp_rank, tp_size, pp_size, is_pipeline_first_stage, mp_group = 0, 1, 1, True, None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimizer_skips_overflow_and_unscales_clean_grads(dtype):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=dtype))
    w.main_grad = torch.zeros(3)
    scaler = DynamicLossScaler(initial_scale=256.0, hysteresis=1, window=1000)
    opt = MixedPrecisionOptimizer([("w", w)], OptimizerConfig(optimizer="sgd", lr=0.5, sgd_momentum=0.0,
                                                             weight_decay=0.0, clip_grad=0.0), _PS(), scaler)
    before = w.detach().clone()
    w.main_grad.copy_(torch.tensor([256.0, float("inf"), 0.0]))
    assert opt.step() == OptimizerStepResult(False, None, None)
    assert torch.equal(w.detach(), before) and scaler.scale == 128.0
    w.main_grad.copy_(torch.tensor([128.0, -256.0, 0.0]))  # = 128 x [1, -2, 0]
    result = opt.step()
    # --clip-grad 0 reports 0.0 (spec §3.2)
    assert result.update_successful and result.grad_norm.item() == 0.0 and result.num_zeros is None
    torch.testing.assert_close(w.detach().float(), torch.tensor([0.5, -1.0, 3.0]))
    assert opt.main_params[0].dtype == torch.float32 and w.grad is None

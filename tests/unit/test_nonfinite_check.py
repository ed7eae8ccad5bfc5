"""--check-for-nan-in-loss-and-grad without host syncs (training/nonfinite.py): a clean step
reads no device value on the host; a recorded NaN/Inf raises the synchronous check's exact
message, for the first bad step; the loop raises it before the iteration line, before a save
and at the end, never after a checkpoint of the bad step."""
import io
import sys

import pytest
import torch

from megatron_lite.data_parallel.ddp import NonFiniteError
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.training.logging import RankLogger
from megatron_lite.training.microbatches import MicroBatchCalculator
from megatron_lite.training.nonfinite import NonFiniteCheck
from megatron_lite.training.tensorboard import TensorboardConfig, TensorboardLogger
from megatron_lite.training.timers import Timers
from megatron_lite.training.train_loop import LoopConfig, LoopHooks, LoopState, Trainer
from megatron_lite.training.train_step import StepResult, train_step
from tests.dp_utils import CPU, build_trainable, micro_batches

# Tensor -> host reads: each blocks on the device for a CUDA tensor.
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _count_host_reads(monkeypatch) -> list[str]:
    """Host reads of tensors made by megatron_lite code (torch's own CPU bookkeeping, such as
    the single-tensor Adam's step counter, is not ours to count)."""
    seen = []
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            if "megatron_lite" in caller.f_code.co_filename:
                seen.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: seen.append("torch.cuda.synchronize"))
    return seen


def _trainable():
    ps = ParallelState.create()
    model, ddp, opt = build_trainable(ps, {"check_for_nan_in_grad": True, "overlap_grad_reduce": True,
                                           "bucket_size": 20_000})
    return ps, model, ddp, opt, micro_batches(model.config.vocab_size, 0, 1)


def test_a_clean_step_reads_nothing_on_the_host(monkeypatch):
    ps, _, ddp, opt, data = _trainable()
    train_step(ddp, opt, data, 2, ps, CPU)  # optimizer state exists from here on
    check = NonFiniteCheck()
    seen = _count_host_reads(monkeypatch)
    for _ in range(2):
        train_step(ddp, opt, data, 2, ps, CPU, nan_check=check)
    assert seen == []
    train_step(ddp, opt, data, 2, ps, CPU)  # without a NonFiniteCheck: checked at once
    assert len(seen) == 1 and seen[0].startswith("item at ") and "nonfinite.py" in seen[0], seen
    monkeypatch.undo()
    check.raise_if_found()  # the record of the clean steps says nothing


def _poison_grad(model):
    # A norm's weight: fused linear weights' and biases' gradients bypass tensor hooks.
    p = dict(model.named_parameters())["decoder.final_layernorm.weight"]
    return p.register_hook(lambda g: g * float("nan"))


def _poison_loss(model):
    with torch.no_grad():
        dict(model.named_parameters())["decoder.final_layernorm.weight"].fill_(float("nan"))


@pytest.mark.parametrize("poison,message", [
    (_poison_grad, r"^Rank 0: found NaN in local grad norm for bucket #0 in backward pass before "
                   r"data-parallel communication collective$"),
    (_poison_loss, r"^Rank 0: found NaN or Inf in local forward loss calculation$"),
], ids=["grad", "loss"])
def test_deferred_check_raises_the_synchronous_message(poison, message):
    for deferred in (False, True):
        ps, model, ddp, opt, data = _trainable()
        poison(model)
        check = NonFiniteCheck() if deferred else None
        with pytest.raises(NonFiniteError, match=message):
            train_step(ddp, opt, data, 2, ps, CPU, nan_check=check)
            assert deferred  # the synchronous check raised inside the step
            check.raise_if_found()


def test_the_first_bad_step_is_the_one_reported():
    ps, model, ddp, opt, data = _trainable()
    check = NonFiniteCheck()
    train_step(ddp, opt, data, 2, ps, CPU, nan_check=check)
    handle = _poison_grad(model)
    train_step(ddp, opt, data, 2, ps, CPU, nan_check=check)  # grads NaN (bucket #0 holds fc2.bias)
    handle.remove()
    _poison_loss(model)
    train_step(ddp, opt, data, 2, ps, CPU, nan_check=check)  # now the loss too
    with pytest.raises(NonFiniteError, match="local grad norm for bucket #0"):
        check.raise_if_found()
    check.raise_if_found()  # read once: nothing left to report


def _loop(bad_iteration, **cfg_kw):
    """A fake step that records a NaN gradient at `bad_iteration`; returns (log, saves, error)."""
    check, out, saves, calls = NonFiniteCheck(), io.StringIO(), [], []

    def step(num_microbatches):
        calls.append(1)
        flags = torch.tensor([False, len(calls) == bad_iteration])
        check.record(flags, lambda i: f"Rank 0: check {i} failed")
        return StepResult(torch.tensor([20.0, 10.0]), True, torch.tensor(1.0))

    class _Opt:
        loss_scale, param_groups = 1.0, [{"lr": 0.1}]

    cfg = LoopConfig(**{"train_iters": 6, "log_interval": 4, "seq_length": 8, "world_size": 1,
                        "flops_per_sample": 1.0, **cfg_kw})
    hooks = LoopHooks(step, save=lambda state: saves.append(state.iteration),
                      check_nonfinite=check.raise_if_found)

    class _Sched:
        def step(self, n):
            pass

    trainer = Trainer(cfg, hooks, optimizer=_Opt(), scheduler=_Sched(),
                      batches=MicroBatchCalculator(8, 1, 1), timers=Timers(), logger=RankLogger(0, 1, out),
                      tensorboard=TensorboardLogger(TensorboardConfig(None), True), device="cpu")
    error = None
    try:
        trainer.train(LoopState())
    except NonFiniteError as e:
        error = str(e)
    return out.getvalue(), saves, error


def test_loop_raises_before_the_line_and_the_save_of_a_bad_step():
    log, saves, error = _loop(3, save_interval=2)
    assert error == "Rank 0: check 1 failed"
    assert saves == [2] and " iteration        4/" not in log  # raised at the line of 4, before its save
    log, saves, error = _loop(4, log_interval=5, save_interval=4)  # raised before the save at 4
    assert error == "Rank 0: check 1 failed" and saves == []
    log, saves, error = _loop(2)  # checked before the line of iteration 4
    assert error == "Rank 0: check 1 failed"
    assert " iteration        1/" in log and " iteration        4/" not in log
    log, saves, error = _loop(6, log_interval=100)  # no line, no save after it: the end checks
    assert error == "Rank 0: check 1 failed"
    log, saves, error = _loop(7)  # never bad
    assert error is None and " iteration        4/" in log

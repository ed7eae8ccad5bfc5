"""The loop's bookkeeping with a fake step: window averages skip skipped iterations
(spec §3.2), first-iteration printing, batch-size ramp-up, exits and running out of data."""
import io
import re
import time

import pytest
import torch

from megatron_lite.training.logging import RankLogger
from megatron_lite.training.microbatches import MicroBatchCalculator
from megatron_lite.training.tensorboard import TensorboardConfig, TensorboardLogger
from megatron_lite.training.timers import Timers
from megatron_lite.training.train_loop import LoopConfig, LoopHooks, LoopState, Trainer
from megatron_lite.training.train_step import StepResult


class _Opt:
    loss_scale = 1.0

    def __init__(self):
        self.param_groups = [{"lr": 0.1}]


class _Sched:
    def __init__(self, opt):
        self.opt, self.steps = opt, 0

    def step(self, n):
        self.steps += n


def _run(losses, skipped=(), log_interval=2, rampup=None, exit_interval=None, train_iters=None):
    out = io.StringIO()
    calls = []

    def step(num_microbatches):
        i = len(calls)
        calls.append(num_microbatches)
        if i >= len(losses):
            raise StopIteration
        ok = i not in skipped
        return StepResult(torch.tensor([losses[i] * 10.0, 10.0]), ok, torch.tensor(2.0) if ok else None)

    opt = _Opt()
    sched = _Sched(opt)
    cfg = LoopConfig(train_iters=train_iters or len(losses), log_interval=log_interval, seq_length=8,
                     world_size=1, flops_per_sample=1.0, exit_interval=exit_interval)
    trainer = Trainer(cfg, LoopHooks(step), optimizer=opt, scheduler=sched,
                      batches=MicroBatchCalculator(8, 1, 1, rampup), timers=Timers(),
                      logger=RankLogger(0, 1, out),
                      tensorboard=TensorboardLogger(TensorboardConfig(None), True), device="cpu")
    state = LoopState()
    reason = trainer.train(state)
    return out.getvalue(), state, sched, calls, reason


def _printed(text):
    return [(int(m.group(1)), float(m.group(2)), int(m.group(3)), int(m.group(4)))
            for m in re.finditer(r"iteration +(\d+)/.*?lm loss: (\S+) \|.*?skipped iterations: +(\d+) \| "
                                 r"number of nan iterations: +(\d+)", text)]


def test_window_average_excludes_skipped_and_first_line_is_not_reset():
    text, state, sched, _, _ = _run([1.0, 2.0, 3.0, 100.0, 5.0, float("nan")], skipped={3, 5})
    rows = _printed(text)
    # iteration 1 printed alone; iteration 2's window still includes iteration 1.
    assert rows[0] == (1, 1.0, 0, 0)
    assert rows[1] == (2, 1.5, 0, 0)
    assert rows[2] == (4, 3.0, 1, 0)  # iteration 4 skipped: excluded from the average
    assert rows[3] == (6, 5.0, 1, 1)  # iteration 6 skipped with a nan loss
    assert state.consumed_train_samples == 48  # skipped iterations still consume samples
    assert sched.steps == 32  # the scheduler only steps on successful iterations


def test_log_interval_one_second_line_averages_the_first_two_iterations():
    """spec §3.2 'Cadence': iteration 1 is a multiple of --log-interval 1 too, yet as the first
    line of the run it resets nothing, so iteration 2's line averages iterations 1 and 2."""
    text, _, _, _, _ = _run([1.0, 2.0, 4.0, 8.0], log_interval=1)
    assert [(it, loss) for it, loss, _, _ in _printed(text)] == [(1, 1.0), (2, 1.5), (3, 4.0), (4, 8.0)]


def test_first_line_keeps_the_timers_running():
    """The elapsed time of the second line is the mean over both iterations (its interval timer
    was not reset by the first line), and the timers block divides by --log-interval."""
    out = io.StringIO()
    timers = Timers(log_level=1)
    durations = iter([0.0, 0.2])

    def step(num_microbatches):
        timers("forward-backward", 1).start()
        time.sleep(next(durations))
        timers("forward-backward", 1).stop()
        return StepResult(torch.tensor([1.0, 1.0]), True, torch.tensor(1.0))

    opt = _Opt()
    cfg = LoopConfig(train_iters=2, log_interval=1, seq_length=8, world_size=1, flops_per_sample=1.0,
                     timing_log_level=1)
    Trainer(cfg, LoopHooks(step), optimizer=opt, scheduler=_Sched(opt),
            batches=MicroBatchCalculator(8, 1, 1), timers=timers, logger=RankLogger(0, 1, out),
            tensorboard=TensorboardLogger(TensorboardConfig(None), True), device="cpu").train(LoopState())
    elapsed = [float(m) for m in re.findall(r"elapsed time per iteration \(ms\): (\S+) \|", out.getvalue())]
    blocks = [float(m) for m in re.findall(r"forward-backward \.+: \(([\d.]+),", out.getvalue())]
    assert len(elapsed) == 2 and elapsed[1] >= 100.0  # (~0 + 200 ms) / 2 iterations
    assert len(blocks) == 2 and blocks[1] >= 200.0  # both iterations' time, / --log-interval (1)


def test_ramp_up_batch_sizes_and_train_samples():
    calc = MicroBatchCalculator(8, 1, 2, rampup=(2, 2, 12))
    sizes, consumed = [], 0
    for _ in range(6):
        sizes.append(calc.global_batch(consumed))
        consumed += sizes[-1]
    assert sizes == [2, 2, 4, 6, 8, 8]
    assert [calc.num_microbatches(c) for c in (0, 4, 8)] == [1, 2, 3]
    assert calc.iterations_for_samples(30) == 6  # 2 + 2 + 4 + 6 = 14 in 4 ramp steps, then 16 / 8
    with pytest.raises(ValueError, match="--rampup-batch-size"):
        MicroBatchCalculator(8, 1, 2, rampup=(3, 1, 10))
    with pytest.raises(ValueError, match="--global-batch-size"):
        MicroBatchCalculator(9, 2, 2)


def test_loop_passes_ramp_microbatches_to_the_step():
    _, state, _, calls, _ = _run([1.0] * 5, rampup=(2, 2, 12))
    assert calls == [2, 2, 4, 6, 8]
    assert state.consumed_train_samples == 2 + 2 + 4 + 6 + 8


def test_exit_interval_and_data_running_out():
    text, state, _, _, reason = _run([1.0] * 6, exit_interval=3)
    assert state.iteration == 3 and reason == "exiting program at iteration 3"
    with pytest.raises(SystemExit, match="training data ran out at iteration 3"):
        _run([1.0, 1.0], train_iters=5)


def test_memory_report_cadence_and_step_hooks():
    """spec §3.4: memory lines on the first two printed iterations and every
    --log-memory-interval iterations; the step hooks see each iteration number once."""
    reports, before, after = [], [], []

    def step(num_microbatches):
        return StepResult(torch.tensor([10.0, 10.0]), True, torch.tensor(1.0))

    opt = _Opt()
    cfg = LoopConfig(train_iters=7, log_interval=2, seq_length=8, world_size=1, flops_per_sample=1.0,
                     log_memory_interval=3)
    hooks = LoopHooks(step, memory_report=reports.append, before_step=before.append, after_step=after.append)
    trainer = Trainer(cfg, hooks, optimizer=opt, scheduler=_Sched(opt), batches=MicroBatchCalculator(8, 1, 1),
                      timers=Timers(), logger=RankLogger(0, 1, io.StringIO()),
                      tensorboard=TensorboardLogger(TensorboardConfig(None), True), device="cpu")
    trainer.train(LoopState())
    assert reports == [1, 2, 3, 6]
    assert before == after == [1, 2, 3, 4, 5, 6, 7]

"""Megatron log templates: the iteration line (spec §3.2) and the timers block (spec §3.3)."""
import datetime
import io

import pytest

from megatron_lite.training.logging import (
    IterationStats,
    RankLogger,
    format_iteration_line,
    saved_checkpoint_line,
    saving_checkpoint_line,
)
from megatron_lite.training.timers import Timers


def _stats(**kw):
    base = dict(iteration=1, train_iters=20, consumed_samples=16, elapsed_ms=1532.44,
                learning_rate=1.5e-5, global_batch_size=16, losses={"lm loss": 10.87452},
                loss_scale=1.0, grad_norm=7.1234, skipped_iterations=0, nan_iterations=0,
                now=datetime.datetime(2026, 1, 1, 10, 0, 0, 123456))
    base.update(kw)
    return IterationStats(**base)


def test_iteration_line_matches_spec_example():
    expected = (" [2026-01-01 10:00:00.123456] iteration        1/      20 | consumed samples:           16 |"
                " elapsed time per iteration (ms): 1532.4 | learning rate: 1.500000E-05 |"
                " global batch size:    16 | lm loss: 1.087452E+01 | loss scale: 1.0 | grad norm: 7.123 |"
                " number of skipped iterations:   0 | number of nan iterations:   0 |")
    assert format_iteration_line(_stats()) == expected


def test_optional_fragments():
    line = format_iteration_line(_stats(grad_norm=None, learning_rate=None, skipped_samples=3,
                                        throughput_tflops=123.45, losses={"lm loss": -1.0},
                                        num_zeros=7, params_norm=2.5))
    assert "grad norm" not in line and "learning rate" not in line and "lm loss" not in line
    assert " consumed samples:           16 | skipped samples:            3 |" in line
    assert " throughput per GPU (TFLOP/s/GPU): 123.5 |" in line
    assert " loss scale: 1.0 | num zeros: 7 | params norm: 2.500 |" in line


def test_timers_minmax_block_format():
    timers = Timers(log_level=2)
    timers("forward-backward", 1)._elapsed = 0.25
    timers("optimizer", 1)._elapsed = 0.0123
    timers("batch-generator", 2)
    block = timers.log_string(["forward-backward", "optimizer", "batch-generator", "absent"], normalizer=2)
    assert block == ("(min, max) time across ranks (ms):\n"
                     "    forward-backward ...............................: (125.00, 125.00)\n"
                     "    optimizer ......................................: (6.15, 6.15)")


def test_timers_max_and_all_formats_and_levels():
    timers = Timers(log_level=1, log_option="max")
    timers("optimizer", 1)._elapsed = 0.002
    assert timers("forward-compute", 2).elapsed() == 0.0  # above the level: a null timer
    expected = "max time across ranks (ms):\n    optimizer " + "." * 38 + ": 2.00"
    assert timers.log_string(["optimizer"]) == expected
    timers = Timers(log_level=1, log_option="all")
    timers("optimizer", 1)._elapsed = 0.002
    assert timers.log_string(["optimizer"]) == "times across ranks (ms):\n  optimizer:\n     rank  0: 2.00"
    with pytest.raises(ValueError, match="--timing-log-option"):
        Timers(log_option="median")


def test_timer_measures_and_resets():
    timers = Timers()
    t = timers("interval-time")
    t.start()
    t.stop()
    assert t.elapsed(reset=True) >= 0.0 and t.elapsed() == 0.0
    with pytest.raises(RuntimeError, match="stopped while not running"):
        t.stop()


def test_rank_logger_routes_by_rank():
    first, last = io.StringIO(), io.StringIO()
    a, b = RankLogger(0, 2, first), RankLogger(1, 2, last)
    for logger in (a, b):
        logger.rank0("setup")
        logger.last("iteration")
    assert first.getvalue() == "setup\n" and last.getvalue() == "iteration\n"


def test_checkpoint_lines_match_spec_with_timestamps():
    """spec §3.7 (HEAD): both lines carry the timestamp; the saved line lists t, gtp_remat, p."""
    now = datetime.datetime(2026, 1, 1, 10, 0, 0, 123456)
    assert saving_checkpoint_line(100, "/ckpt", "torch_dist", now=now) == (
        "[2026-01-01 10:00:00.123456] saving checkpoint at iteration     100 to /ckpt in torch_dist format")
    assert saved_checkpoint_line(100, "/ckpt", (1, 2), (0, 4), now=now) == (
        "  [2026-01-01 10:00:00.123456] successfully saved checkpoint from iteration     100 to /ckpt "
        "[ t 2/2, gtp_remat 1/1, p 1/4 ]")

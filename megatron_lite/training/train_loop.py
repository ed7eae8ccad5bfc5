"""The iteration loop: steps, LR schedule, log-window bookkeeping and the iteration line."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_lite.training.logging import IterationStats, format_iteration_line
from megatron_lite.training.train_step import train_step


@dataclass
class LoopConfig:
    train_iters: int
    global_batch_size: int
    num_microbatches: int
    log_interval: int
    timing_log_level: int = 0


@dataclass
class LogWindow:
    """Accumulators of one log window (spec §3.2: losses averaged over non-skipped iterations)."""

    loss_sum: torch.Tensor | None = None
    iters: int = 0  # all iterations since the last print
    good_iters: int = 0
    skipped: int = 0
    nan: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, loss: torch.Tensor | None, skipped: bool, is_nan: bool) -> None:
        self.iters += 1
        if skipped:
            self.skipped += 1
            self.nan += int(is_nan)
        else:
            self.good_iters += 1
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def mean_loss(self) -> float:
        if not self.good_iters:
            return -1.0  # not printed (spec §3.2)
        return (self.loss_sum / self.good_iters).item()


def run_training(*, model, grad_buffers, optimizer, scheduler, data_iter, ps, device, loop: LoopConfig,
                 timers, logger, iteration: int = 0, consumed_samples: int = 0) -> tuple[int, int]:
    """Train until `loop.train_iters`; returns (iteration, consumed_samples)."""
    window = LogWindow()
    first_logged = False
    timers("interval-time", 0).start(barrier=True)
    while iteration < loop.train_iters:
        result = train_step(model, grad_buffers, optimizer, data_iter, loop.num_microbatches, ps, device)
        iteration += 1
        consumed_samples += loop.global_batch_size
        if result.update_successful:
            scheduler.step(loop.global_batch_size)
        loss = result.loss_sum_count[0] / result.loss_sum_count[1].clamp(min=1)
        is_nan = (not result.update_successful) and not math.isfinite(loss.item())
        window.add(loss, not result.update_successful, is_nan)
        # spec §3.2 (core_v0.16+): the first iteration of a run is always printed, without
        # resetting the window.
        regular = iteration % loop.log_interval == 0
        if regular or not first_logged:
            elapsed = timers("interval-time", 0).elapsed(reset=regular)
            iters = window.iters
            stats = IterationStats(
                iteration=iteration, train_iters=loop.train_iters, consumed_samples=consumed_samples,
                elapsed_ms=elapsed * 1000.0 / max(iters, 1),
                learning_rate=optimizer.param_groups[0]["lr"], global_batch_size=loop.global_batch_size,
                losses={"lm loss": window.mean_loss()}, loss_scale=optimizer.loss_scale,
                grad_norm=result.grad_norm.item() if result.grad_norm is not None else None,
                skipped_iterations=window.skipped, nan_iterations=window.nan)
            logger.last(format_iteration_line(stats))
            if regular:
                window = LogWindow()
            first_logged = True
    timers("interval-time", 0).stop()
    return iteration, consumed_samples

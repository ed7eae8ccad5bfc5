"""The iteration loop: steps, batch-size ramp, LR schedule, evaluation, exits, and the
log-window bookkeeping behind Megatron's per-iteration line (spec §3.2)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_lite.training.evaluate import evaluate, validation_block
from megatron_lite.training.logging import IterationStats, format_iteration_line

# Timer names of spec §3.3, in Megatron's print order; only those that ran are printed.
TIMER_NAMES = ("forward-backward", "layernorm-grads-all-reduce", "embedding-grads-all-reduce",
               "all-grads-sync", "params-all-gather", "optimizer-copy-to-main-grad",
               "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad", "optimizer-count-zeros",
               "optimizer-inner-step", "optimizer-copy-main-to-model-params", "optimizer",
               "batch-generator", "forward-compute", "backward-compute", "forward-recv", "forward-send",
               "backward-recv", "backward-send", "forward-send-forward-recv", "forward-send-backward-recv",
               "backward-send-forward-recv", "backward-send-backward-recv",
               "forward-backward-send-forward-backward-recv")


@dataclass(frozen=True)
class LoopConfig:
    train_iters: int
    log_interval: int
    seq_length: int
    world_size: int
    flops_per_sample: float  # model FLOPs of one sample, forward + backward (spec §3.9)
    eval_interval: int | None = None
    eval_iters: int = 0
    eval_num_microbatches: int = 1
    eval_global_batch_size: int = 0
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    save_interval: int | None = None
    timing_log_level: int = 0
    log_throughput: bool = False
    tensorboard_log_interval: int = 1
    log_params_norm: bool = False
    log_memory_interval: int | None = None


@dataclass
class LoopState:
    """What a checkpoint must carry for the loop to resume exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_train_samples: int = 0
    floating_point_operations_so_far: float = 0.0


@dataclass
class LoopHooks:
    train_step: Callable  # (num_microbatches) -> StepResult
    eval_step: Callable | None = None  # (data_iter, num_microbatches) -> [2] tensor
    valid_iter: object = None
    save: Callable | None = None  # (LoopState) -> None
    signal_handler: object = None  # training.signals.SignalHandler or None
    memory_report: Callable | None = None  # (iteration) -> None; spec §3.4 memory lines
    before_step: Callable | None = None  # (iteration about to run) -> None
    after_step: Callable | None = None  # (iteration just run) -> None; e.g. publishes background saves
    before_eval: Callable | None = None  # () -> None
    after_eval: Callable | None = None  # () -> None
    # () -> None: raises NonFiniteError for a NaN/Inf that a step recorded on the device
    # (training/nonfinite.py); called where the host syncs anyway and before every save.
    check_nonfinite: Callable | None = None


class LogWindow:
    """Accumulators of one log window (spec §3.2: losses averaged over non-skipped iterations)."""

    def __init__(self):
        self.loss_sum, self.iters, self.good_iters, self.skipped, self.nan = None, 0, 0, 0, 0

    def add(self, loss: torch.Tensor, skipped: bool, is_nan: bool) -> None:
        self.iters += 1
        if skipped:
            self.skipped += 1
            self.nan += int(is_nan)
        else:
            self.good_iters += 1
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss

    def mean_loss(self) -> float:
        return (self.loss_sum / self.good_iters).item() if self.good_iters else -1.0


def _eta_line(sec_per_iter: float, cfg: LoopConfig, state: LoopState, batch: int) -> str:
    # Not part of Megatron's template: a separate line (no " iteration " in it, so parsers of
    # the iteration line are unaffected) with the pace and the time left.
    left = max(cfg.train_iters - state.iteration, 0) * sec_per_iter
    h, rem = divmod(int(left), 3600)
    tokens = batch * cfg.seq_length / sec_per_iter if sec_per_iter > 0 else 0.0
    return f" > throughput: {tokens:.1f} tokens/s | time left (ETA): {h}:{rem // 60:02d}:{rem % 60:02d}"


class Trainer:
    def __init__(self, cfg: LoopConfig, hooks: LoopHooks, *, optimizer, scheduler, batches, timers, logger,
                 tensorboard, device, start_time: float | None = None):
        self.cfg, self.hooks, self.optimizer, self.scheduler = cfg, hooks, optimizer, scheduler
        self.batches, self.timers, self.logger = batches, timers, logger
        self.tb, self.device = tensorboard, device
        self.start_time = start_time if start_time is not None else time.time()

    # ---- logging ------------------------------------------------------------------------
    def _log(self, state: LoopState, window: LogWindow, result, first: bool, batch: int,
             params_norm: float | None) -> None:
        """One iteration line. `first`: the first line of this run, whose window and timers stay
        running so that the next line averages over it too (spec §3.2 'Cadence')."""
        self._check_nonfinite()  # a non-finite step is never logged by the rank that found it
        cfg, timers = self.cfg, self.timers
        elapsed = timers("interval-time", 0).elapsed(reset=not first)
        sec_per_iter = elapsed / max(window.iters, 1)
        tflops = None
        if cfg.log_throughput:
            tflops = cfg.flops_per_sample * batch / (sec_per_iter * 1e12 * cfg.world_size)
        stats = IterationStats(
            iteration=state.iteration, train_iters=cfg.train_iters,
            consumed_samples=state.consumed_train_samples, elapsed_ms=sec_per_iter * 1000.0,
            learning_rate=self.optimizer.param_groups[0]["lr"], global_batch_size=batch,
            losses={"lm loss": window.mean_loss()}, loss_scale=self.optimizer.loss_scale,
            grad_norm=result.grad_norm.item() if result.grad_norm is not None else None,
            num_zeros=result.num_zeros.item() if result.num_zeros is not None else None,
            params_norm=params_norm, decoupled_learning_rate=self._decoupled_lr(),
            skipped_iterations=window.skipped, nan_iterations=window.nan,
            skipped_samples=state.skipped_train_samples, throughput_tflops=tflops)
        self.logger.last(format_iteration_line(stats))
        self.logger.last(_eta_line(sec_per_iter, cfg, state, batch))
        if cfg.timing_log_level > 0:
            # spec §3.3: normalized by --log-interval, whatever the window's length.
            block = timers.log_string(list(TIMER_NAMES), normalizer=cfg.log_interval, reset=not first)
            if block:
                self.logger.last(block)
        if self.tb.enabled and self.tb.cfg.log_timers:
            if not first:  # Megatron-LM writes the first line's time (setup included) to stdout only
                self.tb.scalar("iteration-time", sec_per_iter, state.iteration)
            if tflops is not None:
                self.tb.scalar("throughput", tflops, state.iteration)

    def _decoupled_lr(self) -> float | None:
        for group in self.optimizer.param_groups:
            if group.get("is_decoupled_lr"):
                return group["lr"]
        return None

    def _tensorboard_step(self, state: LoopState, loss: torch.Tensor, result, batch: int,
                          params_norm: float | None) -> None:
        tb, it, samples = self.tb, state.iteration, state.consumed_train_samples
        if not tb.enabled or it % self.cfg.tensorboard_log_interval:
            return
        self._check_nonfinite()
        tb.scalar("learning-rate", self.optimizer.param_groups[0]["lr"], it, samples)
        decoupled = self._decoupled_lr()
        if decoupled is not None:
            tb.scalar("decoupled-learning-rate", decoupled, it, samples)
        tb.scalar("batch-size", batch, it, samples)
        if result.update_successful:
            tb.scalar("lm loss", loss.item(), it, samples)
        if tb.cfg.log_loss_scale:
            tb.scalar("loss-scale", self.optimizer.loss_scale, it, samples)
        if result.grad_norm is not None:
            tb.scalar("grad-norm", result.grad_norm.item(), it, samples)
        if result.num_zeros is not None:
            tb.scalar("num-zeros", result.num_zeros.item(), it, samples)
        if params_norm is not None:
            tb.scalar("params-norm", params_norm, it, samples)
        if tb.cfg.log_world_size:
            tb.scalar("world-size", self.cfg.world_size, it, samples)

    # ---- evaluation ---------------------------------------------------------------------
    def _memory_interval(self, state: LoopState) -> bool:
        n = self.cfg.log_memory_interval
        return bool(n) and state.iteration % n == 0

    def run_evaluation(self, state: LoopState, data_iter, prefix: str, count_samples: bool = True) -> float:
        self._check_nonfinite()
        timers = self.timers
        timers("evaluate", 0).start(barrier=True)
        loss = evaluate(self.hooks.eval_step, data_iter, self.cfg.eval_iters, self.cfg.eval_num_microbatches)
        timers("evaluate", 0).stop(barrier=True)
        if count_samples:
            state.consumed_valid_samples += self.cfg.eval_iters * self.cfg.eval_global_batch_size
        self.logger.last(validation_block(prefix, {"lm loss": loss}))
        if self.tb.enabled and count_samples:
            self.tb.scalar("lm loss validation", loss, state.iteration, state.consumed_train_samples)
            if self.tb.cfg.log_validation_ppl:
                ppl = math.exp(min(20.0, loss))
                self.tb.scalar("lm loss validation ppl", ppl, state.iteration, state.consumed_train_samples)
        return loss

    # ---- non-finite check and saves ------------------------------------------------------
    def _check_nonfinite(self) -> None:
        if self.hooks.check_nonfinite is not None:
            self.hooks.check_nonfinite()

    def _save(self, state: LoopState) -> None:
        self._check_nonfinite()  # a checkpoint never holds an unchecked NaN/Inf step
        self.hooks.save(state)

    # ---- exits --------------------------------------------------------------------------
    def _exit_reason(self, state: LoopState) -> str | None:
        cfg, hooks = self.cfg, self.hooks
        if hooks.signal_handler is not None and hooks.signal_handler.any_rank_received(self.device):
            return "exiting program after receiving SIGTERM."
        if cfg.exit_duration_in_mins:
            over = torch.tensor([float((time.time() - self.start_time) / 60.0 > cfg.exit_duration_in_mins)],
                                device=self.device)
            if torch.distributed.is_initialized() and cfg.world_size > 1:
                torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
            if over.item():
                return f"exiting program after {cfg.exit_duration_in_mins} minutes"
        if cfg.exit_interval and state.iteration % cfg.exit_interval == 0:
            return f"exiting program at iteration {state.iteration}"
        return None

    # ---- the loop -----------------------------------------------------------------------
    def train(self, state: LoopState) -> str | None:
        """Run until `train_iters` or an exit condition; returns the exit message, if any."""
        cfg, hooks, timers = self.cfg, self.hooks, self.timers
        window, first_logged, memory_reports = LogWindow(), False, 0
        timers("interval-time", 0).start(barrier=True)
        while state.iteration < cfg.train_iters:
            batch = self.batches.global_batch(state.consumed_train_samples)
            try:
                if hooks.before_step is not None:
                    hooks.before_step(state.iteration + 1)
                result = hooks.train_step(self.batches.num_microbatches(state.consumed_train_samples))
            except StopIteration:
                raise SystemExit(f"error: the training data ran out at iteration {state.iteration + 1} "
                                 f"(consumed samples: {state.consumed_train_samples}); use fewer "
                                 "--train-iters or more data") from None
            state.iteration += 1
            state.consumed_train_samples += batch
            state.floating_point_operations_so_far += cfg.flops_per_sample * batch
            if result.update_successful:
                self.scheduler.step(batch)
            loss = result.loss_sum_count[0] / result.loss_sum_count[1].clamp(min=1)
            is_nan = (not result.update_successful) and not math.isfinite(loss.item())
            window.add(loss, not result.update_successful, is_nan)
            # Every iteration on every rank (a collective), as the value goes to tensorboard too.
            params_norm = self.optimizer.params_norm().item() if cfg.log_params_norm else None
            self._tensorboard_step(state, loss, result, batch, params_norm)
            # spec §3.2 (core_v0.16+): the first iteration of a run is always printed, and its
            # window and timers are not reset (even when it is also a multiple of
            # --log-interval): the next line averages over both.
            first = not first_logged
            # spec §3.4 (core_v0.16+): memory lines after the first two printed iterations,
            # and every --log-memory-interval iterations.
            report_memory = self._memory_interval(state)
            if first or state.iteration % cfg.log_interval == 0:
                self._log(state, window, result, first, batch, params_norm)
                report_memory |= memory_reports < 2
                memory_reports += 1
                first_logged = True
                if not first:
                    window = LogWindow()
            if hooks.memory_report is not None and report_memory:
                hooks.memory_report(state.iteration)
            if hooks.after_step is not None:
                hooks.after_step(state.iteration)
            if (cfg.eval_interval and state.iteration % cfg.eval_interval == 0 and cfg.eval_iters > 0
                    and hooks.valid_iter is not None):
                if hooks.before_eval is not None:
                    hooks.before_eval()
                self.run_evaluation(state, hooks.valid_iter, f"iteration {state.iteration}")
                if hooks.after_eval is not None:
                    hooks.after_eval()
            saved = False
            if hooks.save is not None and cfg.save_interval and state.iteration % cfg.save_interval == 0:
                self._save(state)
                saved = True
            reason = self._exit_reason(state)
            if reason is not None:
                if hooks.save is not None and not saved:
                    self._save(state)
                self._check_nonfinite()
                timers("interval-time", 0).stop()
                self.logger.rank0(reason)
                return reason
        self._check_nonfinite()  # the run does not end well after an unchecked NaN/Inf
        timers("interval-time", 0).stop()
        return None

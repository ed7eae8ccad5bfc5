"""Rank-aware printing and Megatron's log-line templates (spec §3.2, §3.7).

One logger object per run, passed explicitly; it knows whether this process is global rank 0
(argument dump, setup lines) or the last rank (iteration lines, which need the loss that
lives on the last pipeline stage).
"""
from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass


class RankLogger:
    def __init__(self, rank: int = 0, world_size: int = 1, stream=None):
        self.rank, self.world_size = rank, world_size
        self.stream = stream if stream is not None else sys.stdout

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def _emit(self, msg: str) -> None:
        # One write per line: ranks share the pipe, and print()'s separate newline write could
        # let another rank's line land in between.
        self.stream.write(msg + "\n")
        self.stream.flush()

    def rank0(self, msg: str) -> None:
        if self.is_first:
            self._emit(msg)

    def last(self, msg: str) -> None:
        if self.is_last:
            self._emit(msg)

    def all(self, msg: str) -> None:
        self._emit(msg)

    def datetime_line(self, label: str) -> None:
        # spec §3.7: trailing space is part of the template.
        self.rank0(f"[{label}] datetime: {timestamp()} ")


def timestamp(now: datetime.datetime | None = None) -> str:
    """Megatron-LM's log timestamp (spec §3.2, §3.7: microseconds since core_v0.16)."""
    return (now or datetime.datetime.now()).strftime("%Y-%m-%d %H:%M:%S.%f")


def saving_checkpoint_line(iteration: int, save_dir: str, ckpt_format: str = "torch_dist",
                           now: datetime.datetime | None = None) -> str:
    """spec §3.7 (HEAD): printed by rank 0 when a save starts."""
    return (f"[{timestamp(now)}] saving checkpoint at iteration {iteration:7d} to {save_dir} "
            f"in {ckpt_format} format")


def saved_checkpoint_line(iteration: int, save_dir: str, tp: tuple[int, int], pp: tuple[int, int],
                          now: datetime.datetime | None = None) -> str:
    """spec §3.7 (HEAD): printed by rank 0 once the checkpoint is published. `tp`/`pp` are
    (rank, size); HEAD lists its GTP weight-rematerialization group between them, of size 1 here
    (megatron_lite has no such group)."""
    return (f"  [{timestamp(now)}] successfully saved checkpoint from iteration {iteration:7d} to {save_dir} "
            f"[ t {tp[0] + 1}/{tp[1]}, gtp_remat 1/1, p {pp[0] + 1}/{pp[1]} ]")


@dataclass
class IterationStats:
    """What one per-iteration line reports (spec §3.2)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    learning_rate: float | None
    global_batch_size: int
    losses: dict  # key -> window-averaged value
    loss_scale: float
    grad_norm: float | None
    skipped_iterations: int
    nan_iterations: int
    skipped_samples: int = 0
    throughput_tflops: float | None = None
    num_zeros: float | None = None  # printed as Megatron does, e.g. "1234.0"
    params_norm: float | None = None
    decoupled_learning_rate: float | None = None  # with --decoupled-lr
    now: datetime.datetime | None = None


def format_iteration_line(st: IterationStats) -> str:
    s = f" [{timestamp(st.now)}]"
    s += f" iteration {st.iteration:8d}/{st.train_iters:8d} |"
    s += f" consumed samples: {st.consumed_samples:12d} |"
    if st.skipped_samples > 0:
        s += f" skipped samples: {st.skipped_samples:12d} |"
    s += f" elapsed time per iteration (ms): {st.elapsed_ms:.1f} |"
    if st.throughput_tflops is not None:
        s += f" throughput per GPU (TFLOP/s/GPU): {st.throughput_tflops:.1f} |"
    if st.learning_rate is not None:
        s += f" learning rate: {st.learning_rate:.6E} |"
    if st.decoupled_learning_rate is not None:
        s += f" decoupled learning rate: {st.decoupled_learning_rate:.6E} |"
    s += f" global batch size: {st.global_batch_size:5d} |"
    for key, value in st.losses.items():
        if value >= 0:  # spec §3.2: a negative average is not printed
            s += f" {key}: {value:.6E} |"
    s += f" loss scale: {st.loss_scale:.1f} |"
    if st.grad_norm is not None:
        s += f" grad norm: {st.grad_norm:.3f} |"
    if st.num_zeros is not None:
        s += f" num zeros: {st.num_zeros} |"
    if st.params_norm is not None:
        s += f" params norm: {st.params_norm:.3f} |"
    s += f" number of skipped iterations: {st.skipped_iterations:3d} |"
    s += f" number of nan iterations: {st.nan_iterations:3d} |"
    return s

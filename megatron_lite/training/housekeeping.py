"""Per-iteration chores around the training step that Megatron's flags switch on: manual
garbage collection (`--manual-gc*`), emptying the CUDA cache after the optimizer
(`--empty-unused-memory-level 2`; level 1 is inside train_step) and profiling (`--profile`:
nsys capture range via cudaProfilerStart/Stop, or `--use-pytorch-profiler` writing a trace to
`--tensorboard-dir`) between `--profile-step-start` and `--profile-step-end` on
`--profile-ranks`."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HousekeepingConfig:
    manual_gc: bool = False
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True
    empty_unused_memory_level: int = 0
    profile: bool = False
    use_pytorch_profiler: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: tuple[int, ...] = (0,)
    trace_dir: str | None = None  # --tensorboard-dir, where the torch profiler writes


class Housekeeping:
    def __init__(self, cfg: HousekeepingConfig, rank: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.profiling = cfg.profile and rank in cfg.profile_ranks
        self._torch_profiler = None
        self._nsys_active = False

    def start(self, first_iteration: int) -> None:
        """Before the first step of this run (`first_iteration` = the iteration it will be)."""
        if self.cfg.manual_gc:
            gc.disable()  # collections at arbitrary points stall one rank and so all of them
            gc.collect()
        if self.profiling and self.cfg.use_pytorch_profiler:
            start, end = self.cfg.profile_step_start, self.cfg.profile_step_end
            # Steps are counted from this run's first iteration, as the schedule sees them.
            skip = max(start - first_iteration, 0)
            self._torch_profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(skip - 1, 0), warmup=1 if skip > 0 else 0,
                                                 active=end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.cfg.trace_dir),
                record_shapes=True, with_stack=True)
            self._torch_profiler.start()

    def before_step(self, iteration: int) -> None:
        """`iteration`: the 1-based number of the step about to run."""
        if self.profiling and not self.cfg.use_pytorch_profiler and iteration == self.cfg.profile_step_start \
                and self.device.type == "cuda":
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_active = True

    def after_step(self, iteration: int) -> None:
        cfg = self.cfg
        if cfg.empty_unused_memory_level >= 2 and self.device.type == "cuda":
            torch.cuda.empty_cache()
        if cfg.manual_gc and cfg.manual_gc_interval and iteration % cfg.manual_gc_interval == 0:
            gc.collect()
        if self._torch_profiler is not None:
            self._torch_profiler.step()
        if self._nsys_active and iteration >= cfg.profile_step_end:
            torch.cuda.cudart().cudaProfilerStop()
            self._nsys_active = False

    def before_eval(self) -> None:
        if self.cfg.manual_gc and self.cfg.manual_gc_eval:
            gc.collect()

    def after_eval(self) -> None:
        if self.cfg.manual_gc and self.cfg.manual_gc_eval:
            gc.collect(generation=0)

    def close(self) -> None:
        if self._torch_profiler is not None:
            self._torch_profiler.stop()
            self._torch_profiler = None
        if self._nsys_active:
            torch.cuda.cudart().cudaProfilerStop()
            self._nsys_active = False
        if self.cfg.manual_gc:
            gc.enable()

"""Named wall-clock timers and the `(min, max) time across ranks (ms):` block (spec §3.3).

A timer only runs if its level is <= `--timing-log-level`; on CUDA it synchronizes the
device at start/stop (that is what makes the numbers meaningful, and why levels exist).
`--no-barrier-with-level-1-timing` drops the barriers level-1 timers ask for (Megatron-LM passes
`barrier=args.barrier_with_L1_time` to its forward-backward and optimizer timers).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class _Timer:
    def __init__(self, name: str, sync_cuda: bool, allow_barrier: bool = True, group=None):
        self.name, self._sync, self._allow_barrier = name, sync_cuda, allow_barrier
        self._group = group  # the barrier's default group: the whole job (ParallelState.world_group)
        self._elapsed, self._start, self.running = 0.0, 0.0, False

    def _barrier(self, group) -> None:
        group = group if group is not None else self._group
        if self._allow_barrier and group is not None:
            dist.barrier(group=group)

    def start(self, barrier_group=None, barrier: bool = False) -> None:
        if self.running:
            raise RuntimeError(f"timer {self.name!r} started twice")
        if barrier:
            self._barrier(barrier_group)
        if self._sync:
            torch.cuda.synchronize()
        self._start, self.running = time.perf_counter(), True

    def stop(self, barrier_group=None, barrier: bool = False) -> None:
        if not self.running:
            raise RuntimeError(f"timer {self.name!r} stopped while not running")
        if barrier:
            self._barrier(barrier_group)
        if self._sync:
            torch.cuda.synchronize()
        self._elapsed += time.perf_counter() - self._start
        self.running = False

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated so far (including a running interval)."""
        running = self.running
        if running:
            self.stop()
        value = self._elapsed
        if reset:
            self._elapsed = 0.0
        if running:
            self.start()
        return value


class _NullTimer:
    running = False

    def start(self, *a, **k):
        pass

    def stop(self, *a, **k):
        pass

    def elapsed(self, reset: bool = True) -> float:
        return 0.0


class Timers:
    def __init__(self, log_level: int = 0, log_option: str = "minmax", sync_cuda: bool = False,
                 barrier_with_l1: bool = True, group=None):
        """`group`: every rank of the job (ParallelState.world_group), for barriers and the
        gather of the timers block; None in a one-process run."""
        if log_option not in ("minmax", "max", "all"):
            raise ValueError(f"--timing-log-option {log_option!r} must be minmax, max or all")
        self.log_level, self.log_option, self.sync_cuda = log_level, log_option, sync_cuda
        self.barrier_with_l1, self.group = barrier_with_l1, group
        self._timers: dict[str, _Timer] = {}
        self._null = _NullTimer()

    def __call__(self, name: str, log_level: int = 0):
        if log_level > self.log_level:
            return self._null
        if name not in self._timers:
            allow_barrier = log_level != 1 or self.barrier_with_l1
            self._timers[name] = _Timer(name, self.sync_cuda, allow_barrier, self.group)
        return self._timers[name]

    def _gather_ms(self, names: list[str], reset: bool) -> torch.Tensor:
        """`[world, len(names)]` elapsed ms of every rank (0 where a rank never ran a timer)."""
        local = torch.tensor(
            [self._timers[n].elapsed(reset) * 1000.0 if n in self._timers else 0.0 for n in names],
            dtype=torch.float64)
        if self.group is None:
            return local[None]
        # all_gather takes CPU tensors only on gloo; NCCL needs them on the GPU.
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        parts = [torch.zeros_like(local, device=device) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.to(device), group=self.group)
        return torch.stack(parts).cpu()

    def log_string(self, names: list[str], normalizer: float = 1.0, reset: bool = True) -> str | None:
        """Collective: every rank must call it. Returns the block (for the printing rank)."""
        if normalizer <= 0:
            raise ValueError("timer normalizer must be positive")
        times = self._gather_ms(names, reset) / normalizer  # [world, names]
        lines = []
        for j, name in enumerate(names):
            col = times[:, j]
            positive = col[col > 0]  # spec §3.3: ranks that reported no time are ignored
            if positive.numel() == 0:
                continue
            if self.log_option == "minmax":
                lo, hi = positive.min().item(), positive.max().item()
                lines.append(f"    {(name + ' ').ljust(48, '.')}: ({lo:.2f}, {hi:.2f})")
            elif self.log_option == "max":
                lines.append(f"    {(name + ' ').ljust(48, '.')}: {positive.max():.2f}")
            else:
                rows = "".join(f"\n     rank {r:2d}: {t:.2f}" for r, t in enumerate(col.tolist()) if t > 0)
                lines.append(f"\n  {name}:{rows}")
        if not lines:
            return None
        header = {"minmax": "(min, max) time across ranks (ms):", "max": "max time across ranks (ms):",
                  "all": "times across ranks (ms):"}[self.log_option]
        sep = "" if self.log_option == "all" else "\n"
        return header + ("\n" if sep else "") + sep.join(lines)


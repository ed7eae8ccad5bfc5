"""--check-for-nan-in-loss-and-grad without a host synchronization in the step.

Each step compares its loss and its per-bucket local grad norms (taken before the DP
reduction, data_parallel/ddp.py) against NaN/Inf on the device and folds the outcome into
one device scalar: the index of the first failing check of the first bad step. The host
reads that scalar only where it synchronizes anyway: before the iteration line, an
evaluation, a checkpoint save and the end of training (training/train_loop.py). So a
non-finite step costs at most one log interval of wasted steps, its update is never logged
by the rank that found it, and no checkpoint is written after it; the error line is the
one the synchronous check printed (training/failures.py). Calling `train_step` without a
`NonFiniteCheck` keeps the synchronous check (one read before the optimizer step).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_lite.data_parallel.ddp import NonFiniteError


class NonFiniteCheck:
    """Device-side record of the first NaN/Inf that `record` saw since the last `raise_if_found`."""

    def __init__(self):
        # 0-dim int64 on the device: 0 while every check passed, else 1 + index of the first
        # failing check of the first bad step. None: nothing recorded since the last read.
        self._first: torch.Tensor | None = None
        self._describe: Callable[[int], str] | None = None

    def record(self, flags: torch.Tensor, describe: Callable[[int], str]) -> None:
        """`flags` `[n]` bool, True where check i found a non-finite value; `describe(i)` is
        the error message of check i. A few tiny kernels, no host synchronization."""
        code = torch.where(flags.any(), flags.to(torch.int32).argmax() + 1, 0)  # argmax: first True
        if self._first is None:
            self._first = code
        else:  # keep the first bad step's code
            self._first = torch.where(self._first > 0, self._first, code)
        self._describe = describe

    def raise_if_found(self) -> None:
        """Read the record (one host sync) and raise NonFiniteError for the first failure."""
        first, describe = self._first, self._describe
        self._first = self._describe = None
        if first is None:
            return
        code = int(first.item())
        if code:
            raise NonFiniteError(describe(code - 1))

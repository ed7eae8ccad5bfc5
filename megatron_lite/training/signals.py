"""SIGTERM handling for `--exit-signal-handler`: note the signal, let the current iteration
finish, then let the loop save and exit on every rank at the same iteration."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class SignalHandler:
    """Context manager installing a handler that only records the signal (no work inside the
    handler: the process may be in the middle of a collective)."""

    def __init__(self, sig: int = signal.SIGTERM, group=None):
        """`group`: every rank of the job (ParallelState.world_group); None in one process."""
        self.sig, self.received, self._previous, self.group = sig, False, None, group

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __enter__(self) -> SignalHandler:
        self._previous = signal.signal(self.sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.sig, self._previous)

    def any_rank_received(self, device) -> bool:
        """Collective: True on every rank if any rank got the signal."""
        flag = torch.tensor([float(self.received)], device=device)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

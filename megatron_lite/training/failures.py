"""Failures of a running job as one `error:` line each, instead of a traceback: a collective
that a stuck or dead rank never joins (every group carries --distributed-timeout-minutes, so
it ends within that time), a NaN/Inf found by --check-for-nan-in-loss-and-grad, and bad data
met while reading batches (data/errors.py). The
process exits non-zero and torchrun stops the other ranks."""
from __future__ import annotations

import os

import torch.distributed as dist

from megatron_lite.data.errors import DataError
from megatron_lite.data_parallel.ddp import NonFiniteError

# What gloo's RuntimeErrors say when a peer never answers or went away.
_PEER_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")


def is_peer_failure(error: BaseException) -> bool:
    """A collective that timed out or lost its peer (gloo: RuntimeError; NCCL: DistBackendError)."""
    if isinstance(error, dist.DistBackendError):
        return True
    return isinstance(error, RuntimeError) and any(t in str(error) for t in _PEER_SIGNS)


def report_failures(run, *args):
    """`run(*args)`, with the failures above turned into SystemExit("error: ...")."""
    try:
        return run(*args)
    except DataError as e:  # bad data met while reading batches (DataLoader workers included)
        raise SystemExit(f"error: {e}") from None
    except NonFiniteError as e:
        raise SystemExit(f"error: {e} (--no-check-for-nan-in-loss-and-grad turns this check off)") from None
    except (RuntimeError, dist.DistBackendError) as e:
        if not is_peer_failure(e):
            raise
        rank = os.environ.get("RANK", "0")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: rank {rank}: a collective failed, another rank is stuck or dead "
                         f"(--distributed-timeout-minutes): {first}") from None

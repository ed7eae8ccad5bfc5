"""Global sample order and its split across data-parallel ranks (spec §2.11).

Positions `consumed, consumed+1, ...` are dealt in micro-steps of `micro_batch * DP`; DP
rank r takes slots `[r*b, (r+1)*b)` of each. A global batch (M micro-steps) therefore covers
the same samples for any DP size, and resuming only needs `consumed_samples`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def pretraining_batches(total_samples: int, consumed_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    if consumed_samples >= total_samples:
        raise ValueError(f"no samples left: consumed {consumed_samples} of {total_samples}")
    step = micro_batch_size * dp_size
    start = dp_rank * micro_batch_size
    for first in range(consumed_samples, total_samples - step + 1, step):
        yield list(range(first + start, first + start + micro_batch_size))


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}  # [b, s]


def micro_batch_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                         dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    for indices in pretraining_batches(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size):
        yield collate([dataset[i] for i in indices])

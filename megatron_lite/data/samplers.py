"""Global sample order and its split across data-parallel ranks (spec §2.11).

Positions `consumed, consumed+1, ...` are dealt in micro-steps of `micro_batch * DP`; DP
rank r takes slots `[r*b, (r+1)*b)` of each. A global batch (M micro-steps) therefore covers
the same samples for any DP size and any micro-batch size, and resuming only needs
`consumed_samples`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


def _check(total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    if total_samples <= 0:
        raise ValueError(f"no samples to load (dataset size {total_samples})")
    if consumed_samples >= total_samples:
        raise ValueError(f"no samples left: consumed {consumed_samples} of {total_samples}")
    if micro_batch_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad sampler layout: micro batch {micro_batch_size}, "
                         f"dp rank {dp_rank} of {dp_size}")


class PretrainingSampler:
    """`--dataloader-type single`: positions in order from `consumed_samples`; the incomplete
    tail (fewer than b*DP samples) is dropped."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        _check(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)
        self.total, self.consumed, self.b = total_samples, consumed_samples, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.b * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.b * self.dp_size
        start = self.dp_rank * self.b
        for first in range(self.consumed, self.total - step + 1, step):
            yield list(range(first + start, first + start + self.b))


class CyclicSampler:
    """`--dataloader-type cyclic`: an endless stream of epochs, epoch e being
    `torch.randperm(total)` seeded with e. Dealt to DP ranks exactly like `single`, across epoch
    boundaries, so the global batches stay independent of the DP size (Megatron's cyclic sampler
    shards each epoch per DP rank, which ties the order to the DP size)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        _check(total_samples, 0, micro_batch_size, dp_rank, dp_size)
        self.total, self.consumed, self.b = total_samples, consumed_samples, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def _epoch(self, e: int) -> torch.Tensor:
        return torch.randperm(self.total, generator=torch.Generator().manual_seed(e))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.b * self.dp_size
        position = self.consumed + self.dp_rank * self.b
        epoch, perm = -1, None
        while True:
            batch = []
            for p in range(position, position + self.b):
                if p // self.total != epoch:
                    epoch = p // self.total
                    perm = self._epoch(epoch)
                batch.append(int(perm[p % self.total]))
            yield batch
            position += step


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors into `[b, ...]`; bookkeeping keys (BlendedDataset's dataset_id) stay out."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "dataset_id"}  # [b, s]


class LazyIterator:
    """`iter(loader)` on the first `next()`: loaders that a run never reads (valid/test with no
    evaluation) start no worker processes."""

    def __init__(self, loader):
        self.loader, self._it = loader, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)


def pretraining_batches(total_samples: int, consumed_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    """This DP rank's index lists in `single` order."""
    return iter(PretrainingSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size))


def micro_batch_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                         dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches read in this process (no DataLoader workers)."""
    for indices in pretraining_batches(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size):
        yield collate([dataset[i] for i in indices])

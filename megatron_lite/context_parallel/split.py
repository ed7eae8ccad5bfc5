"""The load-balanced ("zig-zag") sequence split of context parallelism (spec §9.1), and the
batch source that reads a micro-batch once per CP group and hands each CP rank its share.

Causal attention makes late tokens more expensive than early ones, so the sequence is cut
into 2·CP chunks and CP rank r keeps chunks r and 2·CP-1-r: every rank then holds one cheap
and one expensive chunk. The local sequence is the two chunks back to back, in that order,
so local positions still increase and a causal mask over the local block stays causal.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

# Batch keys whose dim 1 is the sequence (`[b, s]`); spec §2.7 / data/builders.py.
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# The full micro-batch's loss-token count, added for the loss normalisation (spec §6.4):
# each CP rank holds a part of the tokens but must divide by the count of the whole sequence.
TOKENS_KEY = "cp_num_tokens"


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2·CP sequence chunks that CP rank `cp_rank` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_positions(seq_length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global sequence positions of this rank's local tokens: `[s/cp]` int64."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x CP ({2 * cp_size})")
    c = seq_length // (2 * cp_size)
    first, second = chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])


def split_sequence(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's share of `x` along `dim`: `[.., s, ..] -> [.., s/cp, ..]` (a copy)."""
    if cp_size == 1:
        return x
    s = x.size(dim)
    if s % (2 * cp_size):
        raise ValueError(f"sequence length {s} is not divisible by 2 x CP ({2 * cp_size})")
    c = s // (2 * cp_size)
    first, second = chunk_ids(cp_size, cp_rank)
    return torch.cat([x.narrow(dim, first * c, c), x.narrow(dim, second * c, c)], dim=dim)


def gather_sequence(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `split_sequence`: the CP ranks' shares (in CP-rank order) -> the full tensor."""
    cp = len(parts)
    halves = [p.chunk(2, dim=dim) for p in parts]
    ordered = [halves[t][0] for t in range(cp)] + [halves[t][1] for t in reversed(range(cp))]
    return torch.cat(ordered, dim=dim)


def split_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """Split every `[b, s]` tensor of a micro-batch for this CP rank. Position ids keep their
    true values (RoPE and learned positions see global positions), and the whole sequence's
    loss-token count travels along as `TOKENS_KEY`."""
    if cp_size == 1:
        return batch
    if "attention_mask" in batch:
        raise ValueError("--reset-attention-mask (an explicit attention mask) is not available with "
                         "--context-parallel-size > 1")
    batch = dict(batch)
    tokens = batch["tokens"]
    if "position_ids" not in batch:
        batch["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    if "loss_mask" in batch:
        batch[TOKENS_KEY] = batch["loss_mask"].float().sum()
    for key in SEQUENCE_KEYS:
        if key in batch:
            batch[key] = split_sequence(batch[key], cp_size, cp_rank)
    return batch


class ContextParallelBatches:
    """Micro-batches for one CP rank. CP rank 0 of each group reads the data and broadcasts
    it over the CP group (one read per group, not per rank), then every rank keeps its
    zig-zag share. `source` is only read on CP rank 0 (it may be None elsewhere).

    The micro-batch shape `[b, s]` is fixed and known to every rank, so no header travels and
    nothing waits on the device (no host synchronization in the step). `device`: where the
    broadcast runs (the GPU for NCCL); batches come out on it.
    """

    def __init__(self, source: Iterator | None, cp_group, cp_ranks: list[int], cp_rank: int,
                 micro_batch_size: int, seq_length: int, device: torch.device):
        self.source, self.group, self.src = source, cp_group, cp_ranks[0]
        self.cp_size, self.cp_rank, self.device = len(cp_ranks), cp_rank, torch.device(device)
        self.shape = (micro_batch_size, seq_length)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.cp_size == 1:
            return next(self.source)
        if self.cp_rank == 0:
            ints, floats = self._pack(next(self.source))
        else:
            ints = torch.empty((3, *self.shape), dtype=torch.long, device=self.device)
            floats = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        dist.broadcast(ints, src=self.src, group=self.group)  # [3, b, s]: tokens, labels, positions
        dist.broadcast(floats, src=self.src, group=self.group)  # [b, s]: loss mask
        full = {"tokens": ints[0], "labels": ints[1], "position_ids": ints[2], "loss_mask": floats}
        return split_batch(full, self.cp_size, self.cp_rank)

    def _pack(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "attention_mask" in batch:
            raise ValueError("--reset-attention-mask (an explicit attention mask) is not available with "
                             "--context-parallel-size > 1")
        tokens = batch["tokens"]
        if tuple(tokens.shape) != self.shape:
            raise ValueError(f"micro-batch of shape {tuple(tokens.shape)}, expected {self.shape}")
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        ints = torch.stack([tokens, batch["labels"], positions]).to(self.device, torch.long)  # [3, b, s]
        floats = batch["loss_mask"].to(self.device, torch.float32)  # [b, s]
        return ints.contiguous(), floats.contiguous()

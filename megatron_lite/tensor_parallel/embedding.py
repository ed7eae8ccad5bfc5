"""Vocab-parallel embedding: the table is split by rows over TP (Shoeybi et al. 2019, §3).

Rank r owns vocabulary rows `[r*V/tp, (r+1)*V/tp)`. Each rank looks up the ids it owns,
writes zeros for the others, and the partial results are summed over TP, so every rank ends
with the full embedding. The vocabulary must be padded to a multiple of TP beforehand
(Megatron's --make-vocab-size-divisible-by).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.tensor_parallel.collectives import group_rank, group_size
from megatron_lite.tensor_parallel.mappings import (
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_lite.tensor_parallel.sharding import mark_parallel


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding with weight `[V/tp, h]` (split along dim 0).

    forward(ids `[b, s]` int64) -> `[b, s, h]`, identical on every TP rank.
    The weight starts at zero; the model's init pass (models/init.py) fills it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group,
                 params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        tp = group_size(tp_group)
        if num_embeddings % tp:
            raise ValueError(f"vocabulary size ({num_embeddings}) is not divisible by the "
                             f"tensor-parallel size ({tp}); pad it first")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_group = tp_group
        per_rank = num_embeddings // tp
        self.vocab_start = group_rank(tp_group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = torch.nn.Parameter(
            torch.zeros(per_rank, embedding_dim, dtype=params_dtype, device=device))  # [V/tp, h]
        mark_parallel(self.weight, 0)

    def forward(self, ids: torch.Tensor, scatter_sequence: bool = False) -> torch.Tensor:
        """ids `[b, s]` -> `[b, s, h]`; with `scatter_sequence` (sequence parallelism) this
        rank's chunk of the sequence, sequence-first `[s/tp, b, h]`, by one reduce-scatter
        where an all-reduce and a split would move tp times more data and copy it again
        (Megatron's reduce_scatter_embeddings)."""
        if group_size(self.tp_group) == 1:
            out = F.embedding(ids, self.weight)  # [b, s, h]
            return out.transpose(0, 1).contiguous() if scatter_sequence else out
        foreign = (ids < self.vocab_start) | (ids >= self.vocab_end)  # [b, s]
        local_ids = (ids - self.vocab_start).masked_fill_(foreign, 0)  # [b, s], in [0, V/tp)
        out = F.embedding(local_ids, self.weight)  # [b, s, h]
        # Zero the rows looked up for ids owned elsewhere; their gradient is zeroed with them,
        # so row 0 of this shard receives nothing spurious.
        out = out.masked_fill_(foreign.unsqueeze(-1), 0.0)  # [b, s, h]
        if scatter_sequence:
            out = out.transpose(0, 1).contiguous()  # [s, b, h] partial sums
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)  # [s/tp, b, h]
        return reduce_from_tp_region(out, self.tp_group)  # [b, s, h] summed over tp

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"rows=[{self.vocab_start}, {self.vocab_end})")

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
from megatron_lite.tensor_parallel.layers import accumulates_in_main_grad
from megatron_lite.tensor_parallel.mappings import (
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron_lite.tensor_parallel.sharding import mark_parallel


class _LookupIntoMainGrad(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose backward adds the looked-up rows' gradients straight
    into the fp32 `weight.main_grad` (gradient-accumulation fusion for the table, spec §7.1).

    Autograd's lookup backward builds a dense `[V, h]` gradient in the param dtype that DDP's
    hook then adds to `main_grad`: at Llama-3.2-1B's vocabulary (128256 x 2048, tied to the
    output layer, which adds its own dense `[V, h]`) that was 1.1 ms of adds per micro-batch
    on an H200 (issue 13). `index_put_(accumulate=True)` sorts the ids and sums each row's
    contributions in position order on CUDA, so the result is deterministic."""

    @staticmethod
    def forward(ctx, ids, weight):  # ids [b, s], weight [V/tp, h] -> [b, s, h]
        ctx.save_for_backward(ids)
        # The Parameter itself (as _LinearWithTP keeps it): it carries `main_grad`.
        ctx.param = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):  # grad [b, s, h]
        (ids,) = ctx.saved_tensors
        param = ctx.param
        rows = grad.reshape(-1, grad.shape[-1]).to(param.main_grad.dtype)  # [b*s, h]
        param.main_grad.index_put_((ids.reshape(-1),), rows, accumulate=True)
        param.grad_added_to_main_grad = True
        # A placeholder keeps the AccumulateGrad node, and so DDP's hook, in the graph
        # (layers._weight_grad); the hook discards it.
        return None, torch.empty_like(param)


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding with weight `[V/tp, h]` (split along dim 0).

    forward(ids `[b, s]` int64) -> `[b, s, h]`, identical on every TP rank.
    The weight starts at zero; the model's init pass (models/init.py) fills it.
    `gradient_accumulation_fusion`: the table's gradient goes into `main_grad` directly
    (`_LookupIntoMainGrad`) when the weight lives in a DDP grad buffer. A tied output layer
    on the same stage must then fuse its GEMM too (`linear_with_tp(tied_lookup=True)`),
    since DDP's hook drops the gradient autograd sums for a fused weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group,
                 params_dtype: torch.dtype = torch.float32, device=None,
                 gradient_accumulation_fusion: bool = False):
        super().__init__()
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
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
        lookup = F.embedding
        if self.gradient_accumulation_fusion and accumulates_in_main_grad(self.weight):
            lookup = _LookupIntoMainGrad.apply
        if group_size(self.tp_group) == 1:
            out = lookup(ids, self.weight)  # [b, s, h]
            return out.transpose(0, 1).contiguous() if scatter_sequence else out
        foreign = (ids < self.vocab_start) | (ids >= self.vocab_end)  # [b, s]
        local_ids = (ids - self.vocab_start).masked_fill_(foreign, 0)  # [b, s], in [0, V/tp)
        out = lookup(local_ids, self.weight)  # [b, s, h]
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

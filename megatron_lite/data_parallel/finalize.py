"""Gradient fix-ups after the last micro-batch's backward (spec §7.4 "finalize_model_grads"):
finish the data-parallel reduction, sum sequence-parallel norm/bias grads over TP, sum tied-
embedding grads over the embedding group, and divide by the global token count with
per-token loss (spec §6.4)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.gpt import TIED_EMBEDDING


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    if not tensors:
        return
    if len(tensors) == 1 and tensors[0].is_contiguous():
        # The tied embedding's gradient alone ([V/tp, h] fp32, 1 GB at Llama's vocabulary):
        # reduce it in place rather than copy it into a flat buffer and back.
        dist.all_reduce(tensors[0], group=group)
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum numel]
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def finalize_grads(chunks, ps: ParallelState, num_tokens: torch.Tensor | None = None) -> None:
    """`chunks`: this rank's `DistributedDataParallel` model chunks. `num_tokens` (only with
    per-token loss): this rank's unmasked-token count, meaningful on the last pipeline stage.

    With the distributed optimizer only the local shard of each `main_grad` is reduced over DP
    after step 1; the sums below are elementwise and every rank of a TP or embedding group
    has the same shard ranges (same layout; the tied embedding sits alone in its bucket,
    spec §8.1), so the shards come out right and the rest is never read.
    """
    for chunk in chunks:
        chunk.finish_grad_sync()
    if ps.tp_size > 1:
        # spec §7.4: non-TP params that saw only this rank's sequence chunk (SP norms, biases).
        sp = [p.main_grad for c in chunks for p in c.module.parameters()
              if getattr(p, "sequence_parallel", False) and hasattr(p, "main_grad")]
        _all_reduce_coalesced(sp, ps.tp_group)
    if ps.pp_size > 1 and ps.in_embedding_group and len(ps.embedding_ranks) > 1:
        tied = [p.main_grad for c in chunks for n, p in c.module.named_parameters()
                if hasattr(p, "main_grad") and c.module.global_name(n) == TIED_EMBEDDING]
        _all_reduce_coalesced(tied, ps.embedding_group)
    if num_tokens is not None:
        total = num_tokens.detach().clone().float()
        if ps.pp_size > 1:
            # Only the last stage computes the loss; the others learn the count from it.
            dist.broadcast(total, src=ps.ranks["pp"][-1], group=ps.pp_group)
        if ps.dp_size * ps.cp_size > 1:
            dist.all_reduce(total, group=ps.dp_cp_group)
        for chunk in chunks:
            chunk.scale_gradients(1.0 / total.clamp(min=1))

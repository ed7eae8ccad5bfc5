"""Gradient fix-ups after the last micro-batch's backward (spec §7.4 "finalize_model_grads"):
data-parallel reduction, sequence-parallel norm/bias grads summed over TP, tied-embedding
grads summed over the embedding group."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.distributed.parallel_state import ParallelState


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def finalize_grads(models, buffers, ps: ParallelState, scale_by_dp: bool = True) -> None:
    """`models`/`buffers`: this rank's model chunks and their GradBuffers."""
    dp_cp = ps.dp_size * ps.cp_size
    for buf in buffers:
        if dp_cp > 1:
            if scale_by_dp:
                buf.data.mul_(1.0 / dp_cp)  # spec §8.1: scale, then SUM
            dist.all_reduce(buf.data, group=ps.dp_cp_group)
    if ps.tp_size > 1:
        sp = [p.main_grad for m in models for p in m.parameters()
              if getattr(p, "sequence_parallel", False) and hasattr(p, "main_grad")]
        _all_reduce_coalesced(sp, ps.tp_group)
    if ps.pp_size > 1 and ps.in_embedding_group and len(ps.embedding_ranks) > 1:
        tied = [p.main_grad for m in models for n, p in m.named_parameters()
                if hasattr(p, "main_grad") and m.global_name(n) == "embedding.word_embeddings.weight"]
        _all_reduce_coalesced(tied, ps.embedding_group)

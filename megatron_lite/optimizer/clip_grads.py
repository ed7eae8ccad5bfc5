"""Global gradient norm across model-parallel ranks, without double counting (spec §7.4)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def counts_toward_norm(param, tp_rank: int, is_first_pp_stage: bool) -> bool:
    """A TP-replicated parameter is counted on TP rank 0 only; the last stage's copy of the
    tied embedding is counted on the first stage only."""
    if getattr(param, "shared_embedding", False) and not is_first_pp_stage:
        return False
    return getattr(param, "tensor_model_parallel", False) or tp_rank == 0


def global_l2_norm(tensors: list[torch.Tensor], group, device) -> torch.Tensor:
    """L2 norm of `tensors` (grads or params) summed over `group` (a 0-dim fp32 tensor, no
    host sync)."""
    sq = torch.zeros((), dtype=torch.float32, device=device)
    by_device = {}
    for t in tensors:  # offloaded fp32 mains live on the host (optimizer/cpu_offload.py)
        by_device.setdefault(t.device, []).append(t)
    for same in by_device.values():
        sq = sq + torch.stack(torch._foreach_norm(same, 2.0)).float().pow(2).sum().to(device)
    if group is not None:
        dist.all_reduce(sq, group=group)
    return sq.sqrt()


def global_num_zeros(grads: list[torch.Tensor], group, device) -> torch.Tensor:
    """Number of zero entries of `grads` summed over `group` (0-dim fp64: exact far beyond
    fp32's 2^24; spec §7.3 step 4)."""
    zeros = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        zeros += g.numel() - torch.count_nonzero(g)
    if group is not None:
        dist.all_reduce(zeros, group=group)
    return zeros


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping multiplies the grads by (spec §7.4): `max_norm / (norm + 1e-6)`, at most 1;
    a 0-dim fp32 tensor on the norm's device, never read on the host."""
    return (max_norm / (total_norm + 1.0e-6)).clamp(max=1.0)


def clip_by_norm_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` in place by `clip_coefficient(total_norm, max_norm)` (no host sync)."""
    if not grads:
        return
    torch._foreach_mul_(grads, clip_coefficient(total_norm, max_norm))

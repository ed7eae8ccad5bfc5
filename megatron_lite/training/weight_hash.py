"""`--check-weight-hash-across-dp-replicas-interval N`: data-parallel replicas must hold the same
weights. Before training and every N iterations each rank hashes its parameters and the hashes
are compared over the data-parallel group, as Megatron-LM's `check_param_hashes_across_dp_replicas`
does (SHA-1 of each parameter as fp32 on the CPU, all-gathered over DP, every replica compared).
A mismatch means a replica drifted (a missed all-gather, a non-deterministic update): the run stops
with one `error:` line instead of training on diverged copies.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

_DIGEST_BYTES = 20  # SHA-1


def param_hashes(chunks) -> tuple[list[str], torch.Tensor]:
    """(names, `[n_params, 20]` uint8 SHA-1 digests) of this rank's parameters, chunk by chunk."""
    names, rows = [], []
    for c, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)  # a DistributedDataParallel chunk wraps the model
        for name, param in module.named_parameters():
            data = param.detach().float().cpu().contiguous().numpy()
            rows.append(torch.frombuffer(bytearray(hashlib.sha1(data.tobytes()).digest()), dtype=torch.uint8))
            names.append(f"{name} (model chunk {c})")
    if not rows:
        return names, torch.empty(0, _DIGEST_BYTES, dtype=torch.uint8)
    return names, torch.stack(rows)


def mismatched_params(chunks, group, device) -> list[str]:
    """Collective over `group` (the DP group): the names of this rank's parameters whose hash
    differs on some replica. Every member gets every hash, so all of them agree on the answer."""
    names, local = param_hashes(chunks)
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if size == 1 or not names:
        return []
    local = local.to(device)  # nccl gathers device tensors only
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local, group=group)
    same = torch.stack(gathered).eq(local).all(dim=-1).all(dim=0)  # [n_params]
    return [name for name, ok in zip(names, same.tolist()) if not ok]


def check_weight_hashes(chunks, ps, device, iteration: int, logger) -> None:
    """Stop the run if the DP replicas' weights differ (every member of the DP group exits; its
    DP rank 0 prints the line, so the line appears whichever group drifted; torchrun then stops
    the other ranks), else print Megatron-LM's `>>> Weight hashes match after {iteration}
    iterations...` (global rank 0)."""
    for chunk in chunks:  # with --overlap-param-gather the updated weights may still be in flight
        chunk.finish_param_sync()
    bad = mismatched_params(chunks, ps.dp_group, device)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise SystemExit(f"error: parameter hashes differ across data-parallel replicas after {iteration} "
                         f"iterations (--check-weight-hash-across-dp-replicas-interval): {bad[0]}{more}"
                         if ps.dp_rank == 0 else 1)
    logger.rank0(f">>> Weight hashes match after {iteration} iterations...")

"""The per-rank memory line of spec §3.4, from the CUDA caching allocator's counters."""
from __future__ import annotations

import torch

_MB = 2.0**20


def memory_report_line(rank: int, iteration: int, device) -> str | None:
    """`[Rank r] (after N iterations) memory (MB) | allocated: ... | max reserved: ...`, or None
    off CUDA (the CPU path has no allocator counters to report)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    stats = (torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
             torch.cuda.memory_reserved(device), torch.cuda.max_memory_reserved(device))
    a, b, c, d = (x / _MB for x in stats)
    return (f"[Rank {rank}] (after {iteration} iterations) memory (MB) | allocated: {a:.2f} | "
            f"max allocated: {b:.2f} | reserved: {c:.2f} | max reserved: {d:.2f}")

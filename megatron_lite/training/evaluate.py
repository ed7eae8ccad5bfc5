"""Validation / test evaluation and its log block (spec §3.6)."""
from __future__ import annotations

import math

import torch


def validation_block(prefix: str, losses: dict[str, float], suffix: str = "") -> str:
    """The dashed block of spec §3.6 (note the trailing space of the middle line)."""
    body = f" validation{suffix} loss at {prefix} | "
    for key, value in losses.items():
        body += f"{key} value: {value:.6E} | "
        body += f"{key} PPL: {math.exp(min(20.0, value)):.6E} | "
    dashes = "-" * (len(body) + 1)
    return f"{dashes}\n{body}\n{dashes}"


def evaluate(eval_step, data_iter, eval_iters: int, num_microbatches: int) -> float:
    """Token-weighted mean loss over `eval_iters` iterations (spec §3.6). `eval_step(data_iter,
    num_microbatches)` returns a `[2]` tensor (loss sum, token count) already reduced over
    DP x CP; it runs in no-grad forward-only mode."""
    total = None
    with torch.no_grad():
        for _ in range(eval_iters):
            sums = eval_step(data_iter, num_microbatches)
            total = sums if total is None else total + sums
    return (total[0] / total[1].clamp(min=1)).item()

"""One training iteration: forward/backward over the micro-batches, gradient fix-ups,
optimizer step. The micro-batch loop is the no-pipelining schedule; pipeline schedules
plug in at `forward_backward`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.data_parallel.finalize import finalize_grads


@dataclass
class StepResult:
    loss_sum_count: torch.Tensor  # [2] fp32: masked loss sum and token count over DP x CP
    update_successful: bool
    grad_norm: torch.Tensor | None


def loss_from_batch(model, batch: dict[str, torch.Tensor]):
    """Masked per-token loss of one micro-batch: (loss sum, token count), both 0-dim fp32."""
    losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])  # [b, s] fp32
    mask = batch["loss_mask"].float()
    return (losses * mask).sum(), mask.sum()


def forward_backward(model, data_iter, num_microbatches: int, device, loss_scale: float,
                     per_token_loss: bool = False):
    """No pipelining: gradients accumulate over micro-batches, and the DP reduction is armed
    only for the last one (spec §8.2). spec §6.4 normalisation: each micro-batch
    back-propagates loss_sum / tokens / M (the raw sum with per-token loss), times the loss
    scale. `model`: a DistributedDataParallel chunk."""
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    for i in range(num_microbatches):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iter).items()}
        with model.no_sync() if i < num_microbatches - 1 else contextlib.nullcontext():
            loss_sum, count = loss_from_batch(model, batch)
            loss = loss_sum if per_token_loss else loss_sum / count.clamp(min=1) / num_microbatches
            (loss * loss_scale).backward()
        totals += torch.stack([loss_sum.detach(), count])
    return totals


def train_step(model, optimizer, data_iter, num_microbatches: int, ps, device) -> StepResult:
    """`model`: this rank's DistributedDataParallel chunk (or a list of them)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        chunk.zero_grad_buffer()
        chunk.train()
    cfg = chunks[0].config
    totals = forward_backward(chunks[0], data_iter, num_microbatches, device, optimizer.loss_scale,
                              cfg.calculate_per_token_loss)
    if cfg.check_for_nan_in_grad and not bool(torch.isfinite(totals[0])):
        raise RuntimeError(f"Rank {ps.rank}: found NaN or Inf in local forward loss calculation")
    finalize_grads(chunks, ps, num_tokens=totals[1] if cfg.calculate_per_token_loss else None)
    success, grad_norm = optimizer.step()
    if ps.dp_size * ps.cp_size > 1:
        dist.all_reduce(totals, group=ps.dp_cp_group)  # spec §3.2: token-weighted global mean
    return StepResult(totals, success, grad_norm)


def evaluation_step(model, data_iter, num_microbatches: int, ps, device) -> torch.Tensor:
    """Forward-only pass over one evaluation batch: `[2]` (loss sum, tokens) over DP x CP."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    with torch.no_grad():
        for _ in range(num_microbatches):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iter).items()}
            totals += torch.stack(loss_from_batch(model, batch))
    model.train()
    if ps.dp_size * ps.cp_size > 1:
        dist.all_reduce(totals, group=ps.dp_cp_group)
    return totals

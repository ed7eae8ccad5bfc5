"""One training iteration: forward/backward over the micro-batches through the pipeline
executor (any schedule: gradient accumulation, 1F1B, interleaved), gradient fix-ups,
optimizer step; and the forward-only evaluation step."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.data_parallel.finalize import finalize_grads
from megatron_lite.pipeline_parallel.executor import (
    ForwardBackwardResult,
    GradSyncHooks,
    PipelineConfig,
    PipelineExecutor,
)
from megatron_lite.training.nonfinite import NonFiniteCheck
from megatron_lite.training.timers import Timers


@dataclass
class StepResult:
    loss_sum_count: torch.Tensor  # [2] fp32: masked loss sum and token count over DP x CP
    update_successful: bool
    grad_norm: torch.Tensor | None
    num_zeros: torch.Tensor | None = None  # with --log-num-zeros-in-grad


def as_executor(model, ps) -> PipelineExecutor:
    """`model`: a PipelineExecutor (built once by pretrain, PP >= 1), or this rank's
    DistributedDataParallel chunk / list of chunks without pipelining."""
    if isinstance(model, PipelineExecutor):
        return model
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    per_token = getattr(getattr(chunks[0], "config", None), "calculate_per_token_loss", False)
    return PipelineExecutor(chunks, ps, PipelineConfig(calculate_per_token_loss=per_token))


def forward_backward(model, data_iter, num_microbatches: int, ps, *, loss_scale: float = 1.0,
                     forward_only: bool = False) -> ForwardBackwardResult:
    """Run one global batch's micro-batches through this rank's chunks (spec §6). On the last
    pipeline stage the result holds each micro-batch's (loss sum, tokens); DP reduction of
    gradients is launched per chunk after its last backward (DDP's hooks)."""
    executor = as_executor(model, ps)
    hooks = None if forward_only else GradSyncHooks.for_ddp(executor.chunks)
    return executor.forward_backward(data_iter, num_microbatches, loss_scale=loss_scale,
                                     forward_only=forward_only, grad_sync=hooks)


def _record_nonfinite(check: NonFiniteCheck, loss_sum: torch.Tensor, chunks, ps) -> None:
    """--check-for-nan-in-loss-and-grad: this rank's loss, then each chunk's buckets, as
    device flags (no host sync; `check` is read later)."""
    flags = [~torch.isfinite(loss_sum).reshape(1)]  # [1]
    owners = []  # (chunk, its number of buckets) in flag order
    for chunk in chunks:
        # A chunk type without per-bucket flags checks in its own finish_grad_sync.
        f = chunk.nonfinite_grad_flags() if hasattr(chunk, "nonfinite_grad_flags") else None
        if f is not None:
            flags.append(f)
            owners.append((chunk, f.numel()))

    def describe(i: int) -> str:
        if i == 0:
            return f"Rank {ps.rank}: found NaN or Inf in local forward loss calculation"
        i -= 1
        for chunk, n in owners:
            if i < n:
                return chunk.nonfinite_grad_message(i)
            i -= n
        raise IndexError(i)

    check.record(torch.cat(flags), describe)


def train_step(model, optimizer, data_iter, num_microbatches: int, ps, device, timers=None,
               empty_unused_memory_level: int = 0, nan_check: NonFiniteCheck | None = None) -> StepResult:
    """`model`: see `as_executor`. The loss exists on the last pipeline stage only; other
    stages report zeros (the iteration line is printed by the last rank, spec §3.2).
    `timers`: training/timers.py Timers for the level-1 names of spec §3.3 (None: untimed).
    `empty_unused_memory_level` >= 1 (`--empty-unused-memory-level`) returns the activations'
    cached blocks to the driver before the optimizer allocates its temporaries.
    `nan_check` (with the chunks' `check_for_nan_in_grad`): None checks loss and grads at once,
    before the optimizer step (one host sync, NonFiniteError); a NonFiniteCheck only records
    them on the device for its owner to read at a point that syncs anyway (the training loop)."""
    timers = timers if timers is not None else Timers(log_level=-1)
    executor = as_executor(model, ps)
    chunks = executor.chunks
    for chunk in chunks:
        chunk.zero_grad_buffer()
    executor.train()
    timers("forward-backward", 1).start(barrier=True)
    result = forward_backward(executor, data_iter, num_microbatches, ps, loss_scale=optimizer.loss_scale)
    timers("forward-backward", 1).stop()
    if empty_unused_memory_level >= 1 and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    totals = result.totals
    cfg = chunks[0].config
    timers("all-grads-sync", 1).start()
    finalize_grads(chunks, ps, num_tokens=totals[1] if cfg.calculate_per_token_loss else None)
    timers("all-grads-sync", 1).stop()
    if cfg.check_for_nan_in_grad:
        check = nan_check if nan_check is not None else NonFiniteCheck()
        # Before the DP all-reduce of `totals` below: the local loss names this rank.
        _record_nonfinite(check, totals[0], chunks, ps)
        if nan_check is None:
            check.raise_if_found()
    timers("optimizer", 1).start(barrier=True)
    stepped = optimizer.step()
    timers("optimizer", 1).stop()
    if ps.dp_size * ps.cp_size > 1:
        dist.all_reduce(totals, group=ps.dp_cp_group)  # spec §3.2: token-weighted global mean
    return StepResult(totals, stepped.update_successful, stepped.grad_norm, stepped.num_zeros)


def evaluation_step(model, data_iter, num_microbatches: int, ps, device) -> torch.Tensor:
    """Forward-only pass over one evaluation batch: `[2]` (loss sum, tokens) over DP x CP,
    meaningful on the last pipeline stage (zeros elsewhere)."""
    executor = as_executor(model, ps)
    executor.eval()
    totals = forward_backward(executor, data_iter, num_microbatches, ps, forward_only=True).totals
    executor.train()
    if ps.dp_size * ps.cp_size > 1:
        dist.all_reduce(totals, group=ps.dp_cp_group)
    return totals

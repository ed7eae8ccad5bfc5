"""The distributed optimizer (ZeRO-1, spec §8.3): each DP×CP rank keeps fp32 main params and
optimizer state only for its shard `[r*n/D, (r+1)*n/D)` of every bucket, steps on the
reduce-scattered grads of that shard, and all-gathers the updated params (through the DDP
chunks, which own the buffers and the gather schedule)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.optimizer.clip_grads import counts_toward_norm, global_l2_norm
from megatron_lite.optimizer.core import (
    InnerOptimizerView,
    OptimizerConfig,
    build_inner_optimizer,
    group_key,
    state_bytes,
    unscale_clip_and_step,
)


@dataclass
class _BucketShard:
    """This rank's shard of one bucket: buffer elements `[lo, hi)` and the main-param slices
    cut from it, one per param overlapping the shard (a param may straddle two shards)."""

    buffer: object  # data_parallel.buffers.ParamAndGradBuffer
    lo: int
    hi: int
    main: torch.Tensor  # [hi - lo] fp32: a view of the param buffer for fp32 params, else a copy
    slices: list[tuple[torch.Tensor, int, int]]  # (main slice, start, end) relative to lo

    @property
    def owns_main(self) -> bool:
        return self.buffer.param_dtype != torch.float32


class DistributedOptimizer(InnerOptimizerView):
    def __init__(self, chunks, cfg: OptimizerConfig, ps, grad_scaler=None):
        """`chunks`: this rank's DistributedDataParallel chunks, built with
        `use_distributed_optimizer=True` (so they own param buffers)."""
        self.cfg, self.ps, self.scaler, self.chunks = cfg, ps, grad_scaler, list(chunks)
        self.shards: list[_BucketShard] = []
        groups = {}
        self._norm_mask: list[bool] = []
        for chunk in self.chunks:
            if not chunk.config.use_distributed_optimizer:
                raise ValueError("DistributedOptimizer needs DDP chunks built with use_distributed_optimizer")
            names = {p: n for n, p in chunk.module.named_parameters()}
            for buf in chunk.param_buffers:
                for bucket in buf.buckets:
                    shard = self._shard_of(buf, bucket, chunk.shard_rank, chunk.shard_world, names, groups)
                    self.shards.append(shard)
        self.device = self.chunks[0].param_buffers[0].grad_data.device
        self.inner = build_inner_optimizer(groups, cfg, self.device)
        # spec §7.4: every rank owns a disjoint shard, so norm and inf flag are reduced over
        # all ranks (TP duplicates are masked, DP shards are disjoint).
        self._group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None

    def _shard_of(self, buf, bucket, rank, world, names, groups) -> _BucketShard:
        lo, hi = bucket.shard_range(rank, world)
        lo, hi = bucket.offset + lo, bucket.offset + hi
        local = buf.param_data[lo:hi]  # [n/D]
        main = local if buf.param_dtype == torch.float32 else local.float()
        slices = []
        for p in bucket.params:
            start, end = buf.param_range[p]
            a, b = max(start, lo), min(end, hi)
            if a >= b:
                continue
            piece = main[a - lo:b - lo]
            slices.append((piece, a - lo, b - lo))
            groups.setdefault(group_key(names[p], p, self.cfg), []).append(piece)
            self._norm_mask.append(counts_toward_norm(p, self.ps.tp_rank, self.ps.is_pipeline_first_stage))
        return _BucketShard(buf, lo, hi, main, slices)

    @torch.no_grad()
    def step(self):
        """Returns (update_successful: bool, grad_norm, num_zeros: 0-dim tensors or None)."""
        grads = []
        for shard in self.shards:
            g = shard.buffer.grad_data[shard.lo:shard.hi]  # reduce-scattered shard [n/D]
            g = g if g.dtype == torch.float32 else g.float()
            for piece, a, b in shard.slices:
                piece.grad = g[a:b]
                grads.append(piece.grad)
        try:
            norm_grads = [g for g, keep in zip(grads, self._norm_mask) if keep]
            ok, grad_norm, num_zeros = unscale_clip_and_step(self.inner, grads, norm_grads, self.scaler,
                                                             self.cfg, self._group, self.device)
        finally:
            for shard in self.shards:
                for piece, _, _ in shard.slices:
                    piece.grad = None
        if ok:
            for shard in self.shards:
                if shard.owns_main:
                    shard.buffer.param_data[shard.lo:shard.hi].copy_(shard.main)  # fp32 -> bf16/fp16
            for chunk in self.chunks:
                chunk.start_param_sync()
        return ok, grad_norm, num_zeros

    @torch.no_grad()
    def params_norm(self) -> torch.Tensor:
        """Collective over all ranks: L2 norm of the fp32 main params (disjoint shards, TP
        duplicates masked as for the grad norm)."""
        pieces = [piece for shard in self.shards for piece, _, _ in shard.slices]
        counted = [p for p, keep in zip(pieces, self._norm_mask) if keep]
        return global_l2_norm(counted, self._group, self.device)

    def state_bytes(self) -> int:
        """Optimizer-owned memory of this rank: inner state plus fp32 main shards."""
        copies = sum(s.main.numel() * s.main.element_size() for s in self.shards if s.owns_main)
        return state_bytes(self.inner) + copies

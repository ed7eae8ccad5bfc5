"""The distributed optimizer (ZeRO-1, spec §8.3): each DP×CP rank keeps fp32 main params and
optimizer state only for its shard `[r*n/D, (r+1)*n/D)` of every bucket, steps on the
reduce-scattered grads of that shard, and all-gathers the updated params (through the DDP
chunks, which own the buffers and the gather schedule). On CUDA, Adam's clip, update and write
into the param buffer run as one Triton pass per shard piece (optimizer/fused_adamw.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lite.optimizer import fused_adamw
from megatron_lite.optimizer.clip_grads import counts_toward_norm, global_l2_norm
from megatron_lite.optimizer.core import (
    InnerOptimizerView,
    OptimizerConfig,
    OptimizerStepResult,
    build_inner_optimizer,
    group_key,
    state_bytes,
    unscale_clip_and_step,
)
from megatron_lite.optimizer.cpu_offload import (
    HostUnit,
    HybridOptimizer,
    OffloadConfig,
    host_copy,
    offloaded_prefix,
)


@dataclass
class _BucketShard:
    """This rank's shard of one bucket, or one part of it: buffer elements `[lo, hi)` and the
    main-param slices cut from it, one per param overlapping it (a param may straddle two
    shards). With `--optimizer-cpu-offload` a bucket's shard may be split in two parts, one
    whose main lives on the host (`on_host`) and one on the device."""

    buffer: object  # data_parallel.buffers.ParamAndGradBuffer
    bucket: object  # data_parallel.buffers.Bucket
    lo: int
    hi: int
    main: torch.Tensor  # [hi - lo] fp32: a view of the param buffer for fp32 params, else a copy
    slices: list[tuple[torch.Tensor, int, int]]  # (main slice, start, end) relative to lo
    on_host: bool = False

    @property
    def owns_main(self) -> bool:
        return self.on_host or self.buffer.param_dtype != torch.float32


class DistributedOptimizer(InnerOptimizerView):
    def __init__(self, chunks, cfg: OptimizerConfig, ps, grad_scaler=None,
                 offload: OffloadConfig | None = None):
        """`chunks`: this rank's DistributedDataParallel chunks, built with
        `use_distributed_optimizer=True` (so they own param buffers). `offload`: the leading
        `offload.fraction` of this rank's shard elements is stepped on the host."""
        self.cfg, self.ps, self.scaler, self.chunks = cfg, ps, grad_scaler, list(chunks)
        plan = []  # (chunk, buffer, bucket, lo, hi, [(param, a, b) absolute]) per bucket
        for chunk in self.chunks:
            if not chunk.config.use_distributed_optimizer:
                raise ValueError("DistributedOptimizer needs DDP chunks built with use_distributed_optimizer")
            for buf in chunk.param_buffers:
                for bucket in buf.buckets:
                    plan.append(self._bucket_plan(chunk, buf, bucket))
        sizes = [b - a for *_, pieces in plan for _, a, b in pieces]
        host_left = offloaded_prefix(sizes, offload.fraction) if offload else 0
        self.shards: list[_BucketShard] = []
        self._norm_mask: list[bool] = []
        groups, host_units = {}, []
        for chunk, buf, bucket, lo, hi, pieces in plan:
            names = {p: n for n, p in chunk.module.named_parameters()}
            # The host part first: [lo, cut) holds the pieces still within the offload budget.
            n_host = min(host_left, len(pieces))
            host_left -= n_host
            cut = lo if n_host == 0 else hi if n_host == len(pieces) else pieces[n_host][1]
            for a, b, part, on_host in ((lo, cut, pieces[:n_host], True), (cut, hi, pieces[n_host:], False)):
                if a < b:
                    shard = self._shard(buf, bucket, a, b, part, on_host, names, groups, host_units)
                    self.shards.append(shard)
        self.device = self.chunks[0].param_buffers[0].grad_data.device
        self.inner = (HybridOptimizer(groups, host_units, cfg, offload, self.device) if host_units
                      else build_inner_optimizer(groups, cfg, self.device))
        # spec §7.4: every rank owns a disjoint shard, so norm and inf flag are reduced over
        # all ranks (TP duplicates are masked, DP shards are disjoint).
        self._group = ps.world_group
        # main piece -> its slice of the bf16/fp16 param buffer, written by the fused AdamW
        # pass (optimizer/fused_adamw.py) in place of the per-shard copy; fp32 buffers' mains
        # are the buffer itself. None where the pass can't run (offload, SGD, CPU).
        low_by_main = {piece: s.buffer.param_data[s.lo + a:s.lo + b] for s in self.shards
                       if s.owns_main and not s.on_host for piece, a, b in s.slices}
        self._low_by_main = low_by_main if fused_adamw.available(self.inner, low_by_main) else None

    @staticmethod
    def _bucket_plan(chunk, buf, bucket):
        lo, hi = bucket.shard_range(chunk.shard_rank, chunk.shard_world)
        lo, hi = bucket.offset + lo, bucket.offset + hi
        pieces = []
        for p in bucket.params:
            start, end = buf.param_range[p]
            a, b = max(start, lo), min(end, hi)
            if a < b:
                pieces.append((p, a, b))
        return chunk, buf, bucket, lo, hi, pieces

    def _shard(self, buf, bucket, lo, hi, pieces, on_host, names, groups, host_units) -> _BucketShard:
        local = buf.param_data[lo:hi]  # [hi - lo]
        main = host_copy(local) if on_host else local if buf.param_dtype == torch.float32 else local.float()
        slices = []
        for p, a, b in pieces:
            piece = main[a - lo:b - lo]
            slices.append((piece, a - lo, b - lo))
            key = group_key(names[p], p, self.cfg)
            if on_host:
                host_units.append((key, HostUnit(piece, buf.param_data[a:b])))
            else:
                groups.setdefault(key, []).append(piece)
            self._norm_mask.append(counts_toward_norm(p, self.ps.tp_rank, self.ps.is_pipeline_first_stage))
        return _BucketShard(buf, bucket, lo, hi, main, slices, on_host)

    @torch.no_grad()
    def step(self) -> OptimizerStepResult:
        grads, host_grads = [], []
        for shard in self.shards:
            g = shard.buffer.grad_data[shard.lo:shard.hi]  # reduce-scattered shard [n/D]
            g = g if g.dtype == torch.float32 else g.float()
            for piece, a, b in shard.slices:
                grads.append(g[a:b])
                if shard.on_host:  # unscaled and clipped on the device, then copied over
                    host_grads.append(grads[-1])
                else:
                    piece.grad = grads[-1]
        if host_grads:
            self.inner.host_grads = host_grads
        try:
            norm_grads = [g for g, keep in zip(grads, self._norm_mask) if keep]
            fused = fused_adamw.step_for(self.inner, self._low_by_main)
            result = unscale_clip_and_step(self.inner, grads, norm_grads, self.scaler,
                                           self.cfg, self._group, self.device, fused)
        finally:
            for shard in self.shards:
                for piece, _, _ in shard.slices:
                    piece.grad = None
            if host_grads:
                self.inner.host_grads = []  # a skipped step (overflow) never consumed them
        if result.update_successful:
            for shard in self.shards if fused is None else ():  # the fused pass wrote the params
                if shard.owns_main and not shard.on_host:  # the hybrid step wrote the host parts
                    shard.buffer.param_data[shard.lo:shard.hi].copy_(shard.main)  # fp32 -> bf16/fp16
            for chunk in self.chunks:
                chunk.start_param_sync()
        return result

    @torch.no_grad()
    def params_norm(self) -> torch.Tensor:
        """Collective over all ranks: L2 norm of the fp32 main params (disjoint shards, TP
        duplicates masked as for the grad norm)."""
        pieces = [piece for shard in self.shards for piece, _, _ in shard.slices]
        counted = [p for p, keep in zip(pieces, self._norm_mask) if keep]
        return global_l2_norm(counted, self._group, self.device)

    def state_bytes(self, on_host: bool = False) -> int:
        """Optimizer-owned memory of this rank on the device (or, `on_host`, offloaded to the
        host): inner state plus fp32 main shards."""
        copies = sum(s.main.numel() * s.main.element_size() for s in self.shards
                     if s.owns_main and s.on_host == on_host)
        return state_bytes(self.inner, on_host) + copies

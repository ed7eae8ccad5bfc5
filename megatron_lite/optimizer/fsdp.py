"""The optimizer of an FSDP2-sharded chunk (`--use-torch-fsdp2`, data_parallel/fsdp.py): the fp32
shards FSDP2 keeps are the main params, stepped in place (the next all-gather reads them); the
reduce-scattered fp32 gradient shards are the main grads. Unscale, inf check, clipping and the
inner Adam/SGD step are those of the other optimizers (spec §7.3); like the distributed
optimizer, every rank owns a disjoint part, so the norm is reduced over all ranks with
TP duplicates masked (spec §7.4)."""
from __future__ import annotations

import torch

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


class FullyShardedOptimizer(InnerOptimizerView):
    def __init__(self, chunks, cfg: OptimizerConfig, ps, grad_scaler=None):
        """`chunks`: this rank's FullyShardedChunk (one: FSDP2 runs without pipelining)."""
        self.cfg, self.ps, self.scaler, self.chunks = cfg, ps, grad_scaler, list(chunks)
        self.params, self.main_params, groups = [], [], {}
        for chunk in self.chunks:
            for name, p in chunk.sharded_params():
                # The local shard itself (a view of FSDP2's padded shard storage, which its
                # all-gather reads): a leaf plain tensor the inner optimizer can update in place.
                main = p.to_local().detach()
                self.params.append(p)
                self.main_params.append(main)
                groups.setdefault(group_key(name, p, cfg), []).append(main)
        if not self.params:
            raise ValueError("the optimizer got no trainable parameters")
        self.device = self.chunks[0].device
        self.inner = build_inner_optimizer(groups, cfg, self.device)
        self._norm_mask = [counts_toward_norm(p, ps.tp_rank, ps.is_pipeline_first_stage) for p in self.params]
        # spec §7.4: the DP shards are disjoint and TP duplicates are masked, so the norm and
        # the inf flag are summed over every rank (pipeline parallelism is refused with FSDP2).
        self._group = ps.groups.get("tp-dp-cp")

    @torch.no_grad()
    def step(self) -> OptimizerStepResult:
        grads = []
        for p, main in zip(self.params, self.main_params):
            # A parameter without a gradient this step (unused) steps on zeros, as in DDP.
            g = p.grad.to_local() if p.grad is not None else torch.zeros_like(main)
            main.grad = g
            grads.append(g)
        try:
            norm_grads = [g for g, keep in zip(grads, self._norm_mask) if keep]
            return unscale_clip_and_step(self.inner, grads, norm_grads, self.scaler, self.cfg, self._group,
                                         self.device)
        finally:
            for main in self.main_params:
                main.grad = None

    @torch.no_grad()
    def params_norm(self) -> torch.Tensor:
        """Collective over all ranks: L2 norm of the fp32 shards, TP duplicates masked."""
        counted = [m for m, keep in zip(self.main_params, self._norm_mask) if keep]
        return global_l2_norm(counted, self._group, self.device)

    def state_bytes(self, on_host: bool = False) -> int:
        """Optimizer state of this rank (the fp32 shards belong to the model: not counted)."""
        return 0 if on_host else state_bytes(self.inner)

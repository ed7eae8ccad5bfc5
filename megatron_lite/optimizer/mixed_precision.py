"""The optimizer without sharding: an fp32 main copy of every bf16/fp16 param (fp32 params are
their own main params), loss-scale handling, clipping and the inner Adam/SGD step (spec
§7.1-7.4). Grads arrive in `param.main_grad` (data_parallel/ddp.py), fully reduced over DP.
Part of the mains may live on the host (`--optimizer-cpu-offload`, optimizer/cpu_offload.py).
On CUDA, Adam's clip, update and copy back into the model params run as one Triton pass per
param (optimizer/fused_adamw.py)."""
from __future__ import annotations

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

__all__ = ["MixedPrecisionOptimizer", "OptimizerConfig"]

_PARALLEL_ATTRS = ("tensor_model_parallel", "shared_embedding", "partition_dim", "sequence_parallel")


class MixedPrecisionOptimizer(InnerOptimizerView):
    def __init__(self, named_params, cfg: OptimizerConfig, ps, grad_scaler=None,
                 offload: OffloadConfig | None = None):
        """`offload` (`--optimizer-cpu-offload`): the leading `offload.fraction` of the params
        (by elements) keep their fp32 mains and state on the host (optimizer/cpu_offload.py)."""
        self.cfg, self.ps, self.scaler = cfg, ps, grad_scaler
        self.model_params, self.main_params = [], []
        trainable = [(name, p) for name, p in named_params if p.requires_grad]
        if not trainable:
            raise ValueError("the optimizer got no trainable parameters")
        sizes = [p.numel() for _, p in trainable]
        self._num_host = offloaded_prefix(sizes, offload.fraction) if offload else 0
        groups, host_units = {}, []
        for i, (name, p) in enumerate(trainable):
            on_host = i < self._num_host
            main = host_copy(p) if on_host else p if p.dtype == torch.float32 else p.detach().float()
            for attr in _PARALLEL_ATTRS if main is not p else ():
                if hasattr(p, attr):
                    setattr(main, attr, getattr(p, attr))
            self.model_params.append(p)
            self.main_params.append(main)
            if on_host:
                host_units.append((group_key(name, p, cfg), HostUnit(main, p)))
            else:
                groups.setdefault(group_key(name, p, cfg), []).append(main)
        self.device = self.model_params[0].device
        self.inner = (HybridOptimizer(groups, host_units, cfg, offload, self.device) if host_units
                      else build_inner_optimizer(groups, cfg, self.device))
        self._norm_mask = [counts_toward_norm(p, ps.tp_rank, ps.is_pipeline_first_stage)
                           for p in self.model_params]
        # Device copies written back after the step (the hybrid step writes the host ones).
        self._low_precision = [(p, m) for p, m in zip(self.model_params[self._num_host:],
                                                      self.main_params[self._num_host:]) if m is not p]
        # main -> model param written by the fused AdamW pass (optimizer/fused_adamw.py); None
        # where the pass can't run: the host half of an offload, SGD, no CUDA or no Triton.
        low_by_main = {m: p for p, m in self._low_precision}
        self._low_by_main = low_by_main if fused_adamw.available(self.inner, low_by_main) else None

    def _stats_group(self):
        # spec §7.4: every DP replica holds the same reduced grads, so the norm and the inf
        # flag are reduced over the model-parallel group only.
        return self.ps.mp_group if self.ps.tp_size * self.ps.pp_size > 1 else None

    @torch.no_grad()
    def step(self) -> OptimizerStepResult:
        grads = []
        for i, (p, main) in enumerate(zip(self.model_params, self.main_params)):
            # spec §7.3 step 1: fp32 main_grad is used as is, a bf16/fp16 one is cast.
            grads.append(p.main_grad if p.main_grad.dtype == torch.float32 else p.main_grad.float())
            if i >= self._num_host:
                main.grad = grads[-1]
        if self._num_host:  # unscaled and clipped on the device with the rest, then copied over
            self.inner.host_grads = grads[:self._num_host]
        try:
            norm_grads = [g for g, keep in zip(grads, self._norm_mask) if keep]
            fused = fused_adamw.step_for(self.inner, self._low_by_main)
            result = unscale_clip_and_step(self.inner, grads, norm_grads, self.scaler,
                                           self.cfg, self._stats_group(), self.device, fused)
            if result.update_successful and self._low_precision and fused is None:
                low, mains = zip(*self._low_precision)
                torch._foreach_copy_(list(low), list(mains))  # fp32 main -> bf16/fp16 model params
        finally:
            # An fp32 param's .grad aliases its main_grad; left set, the next backward would
            # accumulate into the buffer twice.
            for main in self.main_params:
                main.grad = None
            if self._num_host:
                self.inner.host_grads = []  # a skipped step (overflow) never consumed them
        return result

    @torch.no_grad()
    def params_norm(self) -> torch.Tensor:
        """Collective over the model-parallel group: L2 norm of the fp32 main params, each
        counted once (`--log-params-norm`)."""
        counted = [m for m, keep in zip(self.main_params, self._norm_mask) if keep]
        return global_l2_norm(counted, self._stats_group(), self.device)

    def state_bytes(self, on_host: bool = False) -> int:
        """Optimizer-owned memory on the device (or, `on_host`, offloaded to the host): inner
        state plus fp32 main copies."""
        mains = self.main_params[:self._num_host] if on_host else [m for _, m in self._low_precision]
        return state_bytes(self.inner, on_host) + sum(m.numel() * m.element_size() for m in mains)

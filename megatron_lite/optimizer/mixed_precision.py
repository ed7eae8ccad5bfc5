"""The optimizer wrapper: fp32 main params, loss scaling, clipping, inner Adam/SGD step
(spec §7.1-7.4). Model params may be fp32, bf16 or fp16; grads arrive in `param.main_grad`
(see data_parallel/grad_buffer.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.optimizer.clip_grads import clip_by_norm_, counts_toward_norm, global_grad_norm


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0


def _no_weight_decay(name: str, param) -> bool:
    # spec §7.3: biases and every 1-D parameter (norm weights) are not decayed.
    return param.ndim == 1 or name.endswith(".bias")


class MixedPrecisionOptimizer:
    def __init__(self, named_params, cfg: OptimizerConfig, ps, grad_scaler=None):
        self.cfg, self.ps, self.scaler = cfg, ps, grad_scaler
        self.model_params, self.main_params, groups = [], [], {True: [], False: []}
        for name, p in named_params:
            if not p.requires_grad:
                continue
            # fp32 params are their own main params; low-precision ones get an fp32 master copy.
            main = p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
            if main is not p:
                for attr in ("tensor_model_parallel", "shared_embedding", "partition_dim"):
                    if hasattr(p, attr):
                        setattr(main, attr, getattr(p, attr))
            self.model_params.append(p)
            self.main_params.append(main)
            groups[_no_weight_decay(name, p)].append(main)
        param_groups = [{"params": groups[False], "wd_mult": 1.0},
                        {"params": groups[True], "wd_mult": 0.0}]
        param_groups = [g for g in param_groups if g["params"]]
        device = self.main_params[0].device
        fused = {"fused": True} if device.type == "cuda" else {"foreach": False}
        if cfg.optimizer == "adam":
            self.inner = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay, **fused)
        elif cfg.optimizer == "sgd":
            self.inner = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.sgd_momentum,
                                         weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"--optimizer {cfg.optimizer!r} is not supported (adam or sgd)")
        self._norm_mask = [counts_toward_norm(p, ps.tp_rank, ps.is_pipeline_first_stage)
                           for p in self.model_params]
        self.device = device
        self._low_precision = [(p, m) for p, m in zip(self.model_params, self.main_params) if m is not p]

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def _stats_group(self):
        return self.ps.mp_group if self.ps.tp_size * self.ps.pp_size > 1 else None

    @torch.no_grad()
    def step(self):
        """Returns (update_successful: bool, grad_norm: 0-dim tensor or None)."""
        for p, main in zip(self.model_params, self.main_params):
            main.grad = p.main_grad if main.dtype == p.main_grad.dtype else p.main_grad.float()
        grads = [m.grad for m in self.main_params]
        if self.scaler is not None:
            found_inf = torch.zeros(1, device=self.device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                grads, found_inf, torch.full((), 1.0 / self.scaler.scale, device=self.device))
            if self._stats_group() is not None:
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=self._stats_group())
            inf = bool(found_inf.item())  # the skip decision needs the host
            self.scaler.update(inf)
            if inf:
                return False, None
        norm_grads = [g for g, keep in zip(grads, self._norm_mask) if keep]
        grad_norm = global_grad_norm(norm_grads, self._stats_group(), self.device)
        if self.cfg.clip_grad > 0:
            clip_by_norm_(grads, grad_norm, self.cfg.clip_grad)
        else:
            grad_norm = torch.zeros((), device=self.device)  # spec §3.2: 0.0 with --clip-grad 0
        self.inner.step()
        if self._low_precision:
            low, mains = zip(*self._low_precision)
            torch._foreach_copy_(list(low), list(mains))  # fp32 main -> bf16/fp16 model params
        for main in self.main_params:
            main.grad = None
        return True, grad_norm

    def state_dict(self) -> dict:
        out = {"optimizer": self.inner.state_dict()}
        if self.scaler is not None:
            out["grad_scaler"] = self.scaler.state_dict()
        return out

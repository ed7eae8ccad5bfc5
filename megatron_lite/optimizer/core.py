"""What the plain and the distributed optimizer share: the config, weight-decay groups, the
inner torch optimizer, and the unscale / inf-check / clip / step sequence of spec §7.3 on a
list of fp32 main params whose `.grad` is already set."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.optimizer.clip_grads import clip_by_norm_, global_grad_norm


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


def no_weight_decay(name: str, param) -> bool:
    # spec §7.3: biases and every 1-D parameter (norm weights) are not decayed.
    return param.ndim == 1 or name.endswith(".bias")


def build_inner_optimizer(decay: list[torch.Tensor], no_decay: list[torch.Tensor], cfg: OptimizerConfig,
                          device: torch.device) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD over two groups, decayed first; a group may be
    empty (a distributed-optimizer shard), but both always exist so every rank's
    `param_groups[i]` means the same thing to the LR/WD scheduler."""
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    # Fused (one kernel for all params) on the GPU; the CPU path is for tests, where the
    # single-tensor loop keeps results independent of how params are grouped.
    impl = {"fused": True} if device.type == "cuda" else {"foreach": False}
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, **impl)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                               **impl)
    raise ValueError(f"--optimizer {cfg.optimizer!r} is not supported (adam or sgd)")


def unscale_clip_and_step(inner: torch.optim.Optimizer, grads: list[torch.Tensor],
                          norm_grads: list[torch.Tensor], scaler, clip_grad: float, group,
                          device: torch.device):
    """Steps 2-5 of spec §7.3 on fp32 main grads `grads` (`norm_grads`: the subset counted
    in the norm, §7.4). `group`: the grad-stats group (None for a single rank).
    Returns (update_successful, grad_norm 0-dim tensor or None)."""
    if scaler is not None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scaler.inv_scale(device))
        if group is not None:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        inf = bool(found_inf.item())  # the skip decision needs the host
        scaler.update(inf)
        if inf:
            return False, None
    grad_norm = global_grad_norm(norm_grads, group, device)
    if clip_grad > 0:
        clip_by_norm_(grads, grad_norm, clip_grad)
    else:
        grad_norm = torch.zeros((), device=device)  # spec §3.2: 0.0 with --clip-grad 0
    inner.step()
    return True, grad_norm


def state_bytes(inner: torch.optim.Optimizer) -> int:
    """Bytes held in the inner optimizer's state (Adam moments, SGD momentum)."""
    return sum(v.numel() * v.element_size() for st in inner.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)

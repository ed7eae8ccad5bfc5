"""What the plain and the distributed optimizer share: the config, weight-decay groups, the
inner torch optimizer, and the unscale / inf-check / clip / step sequence of spec §7.3 on a
list of fp32 main params whose `.grad` is already set."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.optimizer.clip_grads import (
    clip_by_norm_,
    clip_coefficient,
    global_l2_norm,
    global_num_zeros,
)


@dataclass(frozen=True)
class OptimizerStepResult:
    """What every optimizer's `step()` reports (spec §7.3). `grad_norm` / `num_zeros`: 0-dim
    tensors, None on a skipped step (overflow); `num_zeros` also None without
    `--log-num-zeros-in-grad`. Tensors, not floats: reading them would sync the host."""
    update_successful: bool
    grad_norm: torch.Tensor | None = None
    num_zeros: torch.Tensor | None = None


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
    log_num_zeros_in_grad: bool = False
    decoupled_lr: float | None = None  # --decoupled-lr: embedding/output weights' max LR
    decoupled_min_lr: float | None = None  # its minimum (default: the scheduler's --min-lr)


def no_weight_decay(name: str, param) -> bool:
    # spec §7.3: biases and every 1-D parameter (norm weights) are not decayed.
    return param.ndim == 1 or name.endswith(".bias")


def is_embedding_or_output(name: str) -> bool:
    # The tables `--decoupled-lr` applies to (spec §7.3): input embedding and output layer.
    return name.endswith(("word_embeddings.weight", "output_layer.weight"))


def group_key(name: str, param, cfg: OptimizerConfig) -> tuple[bool, bool]:
    """(not weight-decayed, on the decoupled LR) for a parameter of local name `name`."""
    return no_weight_decay(name, param), cfg.decoupled_lr is not None and is_embedding_or_output(name)


def build_inner_optimizer(groups: dict[tuple[bool, bool], list[torch.Tensor]], cfg: OptimizerConfig,
                          device: torch.device, host: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD over the `group_key` groups: decayed, not
    decayed, and with `--decoupled-lr` the same two on the embedding/output LR. A group may
    be empty (a distributed-optimizer shard), but all always exist so every rank's
    `param_groups[i]` means the same thing to the LR/WD scheduler; group 0 is the one whose
    LR the log prints. `host`: the offloaded half of a hybrid step (cpu_offload.py)."""
    keys = [(False, False), (True, False)]
    if cfg.decoupled_lr is not None:
        keys += [(False, True), (True, True)]
    param_groups = []
    for no_wd, decoupled in keys:
        group = {"params": groups.get((no_wd, decoupled), []), "wd_mult": 0.0 if no_wd else 1.0,
                 "is_decoupled_lr": decoupled}
        if decoupled:  # read by the scheduler instead of its own max/min LR
            group["max_lr"] = cfg.decoupled_lr
            if cfg.decoupled_min_lr is not None:
                group["min_lr"] = cfg.decoupled_min_lr
        param_groups.append(group)
    groups = param_groups
    # Fused (one kernel for all params) on the GPU, and for offloaded state on the host, where
    # torch's fused CPU kernel is vectorized and multi-threaded (10x the single-tensor loop).
    # The CPU test path otherwise keeps the single-tensor loop: results independent of grouping.
    impl = {"fused": True} if device.type == "cuda" or host else {"foreach": False}
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, **impl)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                               **impl)
    raise ValueError(f"--optimizer {cfg.optimizer!r} is not supported (adam or sgd)")


def is_adam(inner) -> bool:
    """Whether `inner` (a torch optimizer or a HybridOptimizer) keeps Adam moments."""
    return isinstance(getattr(inner, "device_opt", inner), torch.optim.AdamW)


def unscale_clip_and_step(inner: torch.optim.Optimizer, grads: list[torch.Tensor],
                          norm_grads: list[torch.Tensor], scaler, cfg: OptimizerConfig, group,
                          device: torch.device, fused_step=None) -> OptimizerStepResult:
    """Steps 2-5 of spec §7.3 on fp32 main grads `grads` (`norm_grads`: the subset counted
    in the norm, §7.4), all on `device`. `group`: the grad-stats group (None for a single rank).
    `fused_step(coeff)`, when given, replaces the clip multiply and `inner.step()`: it applies
    the clip coefficient (a 0-dim tensor, None without clipping) as it loads each grad
    (optimizer/fused_adamw.py). Returns the step's OptimizerStepResult."""
    if scaler is not None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scaler.inv_scale(device))
        if group is not None:
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        inf = bool(found_inf.item())  # the skip decision needs the host
        scaler.update(inf)
        if inf:
            return OptimizerStepResult(False)
    grad_norm = global_l2_norm(norm_grads, group, device)
    clip = cfg.clip_grad > 0
    if clip and fused_step is None:
        clip_by_norm_(grads, grad_norm, cfg.clip_grad)
    # With `fused_step` the grads are clipped only inside the fused pass, so zeros are counted
    # on the unclipped grads: different only where clipping underflows an entry to 0.
    num_zeros = global_num_zeros(norm_grads, group, device) if cfg.log_num_zeros_in_grad else None
    if fused_step is not None:
        fused_step(clip_coefficient(grad_norm, cfg.clip_grad) if clip else None)
    else:
        inner.step()
    if not clip:
        grad_norm = torch.zeros((), device=device)  # spec §3.2: 0.0 with --clip-grad 0
    return OptimizerStepResult(True, grad_norm, num_zeros)


class InnerOptimizerView:
    """What the scheduler and the log read off either optimizer: the inner optimizer's
    param groups and the current loss scale. Needs `self.inner` and `self.scaler`."""

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0


def state_bytes(inner: torch.optim.Optimizer, on_host: bool = False) -> int:
    """Bytes of the inner optimizer's state (Adam moments, SGD momentum) on the device, or
    with `on_host` the offloaded part (cpu_offload.py) in host memory."""
    host = {id(u.main) for u in getattr(inner, "units", ())}
    return sum(v.numel() * v.element_size() for main, st in inner.state.items()
               if (id(main) in host) == on_host for v in st.values() if torch.is_tensor(v) and v.dim() > 0)

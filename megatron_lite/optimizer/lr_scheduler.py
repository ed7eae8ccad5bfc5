"""Learning-rate and weight-decay schedules, stepped in samples (spec §10 "LR formula")."""
from __future__ import annotations

import math


class OptimizerParamScheduler:
    def __init__(self, optimizer, *, max_lr: float, min_lr: float, lr_warmup_steps: int,
                 lr_decay_steps: int, lr_decay_style: str, start_wd: float, end_wd: float,
                 wd_incr_steps: int, wd_incr_style: str = "constant", init_lr: float = 0.0,
                 wsd_decay_steps: int | None = None, lr_wsd_decay_style: str | None = None):
        if lr_decay_steps <= 0:
            raise ValueError("learning-rate decay steps must be positive (--lr-decay-iters/--train-iters)")
        if lr_warmup_steps >= lr_decay_steps and lr_decay_style != "constant":
            raise ValueError(f"warmup ({lr_warmup_steps} samples) must be shorter than decay "
                             f"({lr_decay_steps} samples): check --lr-warmup-* and --lr-decay-*")
        if lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
            raise ValueError(f"--lr-decay-style {lr_decay_style!r} is not supported")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), float(min_lr), float(init_lr)
        self.lr_warmup_steps, self.lr_decay_steps = lr_warmup_steps, lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        self.start_wd, self.end_wd = start_wd, end_wd
        self.wd_incr_steps, self.wd_incr_style = wd_incr_steps, wd_incr_style
        self.num_steps = 0
        self.step(0)  # Megatron steps once with 0 at construction so groups get their LR.

    def get_lr(self, group: dict | None = None) -> float:
        """The LR now; a param group with its own `max_lr` / `min_lr` (`--decoupled-lr`)
        follows the same schedule between those."""
        group = group or {}
        max_lr, min_lr = group.get("max_lr", self.max_lr), group.get("min_lr", self.min_lr)
        n, warmup, decay = self.num_steps, self.lr_warmup_steps, self.lr_decay_steps
        if warmup > 0 and n <= warmup:
            return self.init_lr + (max_lr - self.init_lr) * n / warmup
        if self.lr_decay_style == "constant":
            return max_lr
        if n > decay:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1))
            return max(min_lr, lr)
        ratio = (n - warmup) / (decay - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: stable at max, then anneal over the last wsd_decay_steps
            wsd = self.wsd_decay_steps or 0
            if n <= decay - wsd:
                coeff = 1.0
            else:
                x = (n - (decay - wsd)) / wsd
                coeff = {
                    "exponential": lambda: 2.0 * 0.5**x - 1.0,
                    "linear": lambda: 1.0 - x,
                    "cosine": lambda: 0.5 * (math.cos(math.pi * x) + 1.0),
                    "minus_sqrt": lambda: 1.0 - math.sqrt(x),
                }[self.lr_wsd_decay_style or "exponential"]()
        return min_lr + coeff * (max_lr - min_lr)

    def get_wd(self) -> float:
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps:
            return self.end_wd if self.wd_incr_style != "constant" else self.start_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        elif self.wd_incr_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        else:
            raise ValueError(f"--weight-decay-incr-style {self.wd_incr_style!r} is not supported")
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def step(self, increment: int) -> None:
        self.num_steps += increment
        wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    _STATE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "num_steps", "lr_decay_style", "lr_decay_steps",
                   "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE_KEYS}

    # Settings a resumed run must agree on (Megatron's _check_and_set, spec §4.5); the weight
    # decay keys follow the command line, as in Megatron.
    _CHECKED_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")

    def load_state_dict(self, state: dict, override: bool = False, use_checkpoint: bool = False) -> None:
        """Restore the step count. Each checked setting must equal the saved one, unless
        `override` (--override-opt_param-scheduler: keep ours) or `use_checkpoint`
        (--use-checkpoint-opt_param-scheduler: take the saved one); a mismatch is a ValueError
        naming both flags. Nothing changes before every setting has been checked."""
        adopt = {}
        for key in self._CHECKED_KEYS:
            mine, theirs = getattr(self, key), state[key]
            if mine == theirs or override:
                continue
            if not use_checkpoint:
                raise ValueError(f"learning-rate schedule value {key} is {theirs!r} in the checkpoint but "
                                 f"{mine!r} now; pass --override-opt_param-scheduler or "
                                 "--use-checkpoint-opt_param-scheduler")
            adopt[key] = theirs
        for key, value in adopt.items():
            setattr(self, key, value)
        self.num_steps = state["num_steps"]
        self.step(0)

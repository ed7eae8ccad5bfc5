"""Writing a checkpoint in Megatron-LM's `torch_dist` layout (spec §4.3), for
`tools/checkpoint/convert.py --saver core`: the run moves to Megatron-LM with `--load`.

What is written mirrors what Megatron-LM itself wrote for tests/data/megatron_checkpoints:
* every transformer-layer tensor stacked on a leading layer axis under
  `decoder.layers.<submodule>` (fused-norm names, keys.py), the rest under its own name;
* the optimizer in the non-distributed layout, `optimizer.state.{exp_avg,exp_avg_sq}.<key>`
  plus `optimizer.state.fp32_param.<key>` when the weights are bf16/fp16 (a Megatron run
  with `--use-distributed-optimizer` reads it only with `--no-load-optim`, as Megatron's own
  layouts require);
* `common_state/shard_0_1`: args (an `argparse.Namespace`), iteration, scheduler, the Adam
  step and param groups, FLOPs so far — plain Python objects only, so Megatron's
  `weights_only` loading accepts it;
* one `_extra_state` entry per layer of each linear (None, as the local spec writes).
RNG and rerun-state-machine state are not written (their pickles name Megatron's own
classes): load in Megatron with `--no-load-rng`, as for Megatron's own converters' output.
"""
from __future__ import annotations

import argparse
import os
import signal
from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

from megatron_lite.checkpoint.layout import (
    METADATA,
    METADATA_CONTENT,
    iteration_dir,
    write_json,
    write_tracker,
)
from megatron_lite.checkpoint.megatron.keys import LAYERS, to_megatron
from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler

_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}
# The keys of a param group as Megatron's optimizer records them (its 'params' are rebuilt on load).
_GROUP_FLAGS = {"is_expert_parallel": False, "default_config": True, "lr_mult": 1.0, "is_decoupled_lr": False,
                "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                "differentiable": False, "fused": None, "decoupled_weight_decay": True}


def stack_layers(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Our global names -> Megatron keys, per-layer tensors stacked on a new leading axis."""
    out, layers = {}, {}
    for name, tensor in tensors.items():
        key = to_megatron(name)
        if key.layer is None:
            out[key.name] = tensor
        else:
            layers.setdefault(key.name, {})[key.layer] = tensor
    for key, per_layer in layers.items():
        if sorted(per_layer) != list(range(num_layers)):
            raise ValueError(f"{key}: the checkpoint has layers {sorted(per_layer)} of {num_layers}")
        out[key] = torch.stack([per_layer[i] for i in range(num_layers)])  # [L, ...]
    return out


def _namespace(args: dict) -> argparse.Namespace:
    # JSON turned dtypes and signals into their names; Megatron reads them back as objects.
    out = {k: _DTYPES.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    if isinstance(out.get("exit_signal"), str) and out["exit_signal"] in signal.Signals.__members__:
        out["exit_signal"] = signal.Signals[out["exit_signal"]]
    return argparse.Namespace(**out)


def _current_lr(args: dict, scheduler: dict) -> float:
    """The LR the groups held when saved: the schedule evaluated at its recorded step."""
    keys = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
            "wd_incr_steps", "wd_incr_style")
    try:
        sched = OptimizerParamScheduler(
            SimpleNamespace(param_groups=[]), **{k: scheduler[k] for k in keys},
            init_lr=args.get("lr_warmup_init") or 0.0, wsd_decay_steps=args.get("lr_wsd_decay_samples"),
            lr_wsd_decay_style=args.get("lr_wsd_decay_style"))
        sched.num_steps = scheduler["num_steps"]
        return sched.get_lr()
    except (KeyError, TypeError, ValueError):  # no or foreign schedule: the peak LR
        return scheduler.get("max_lr", args.get("lr"))


def _param_groups(args: dict, scheduler: dict) -> list[dict]:
    lr = _current_lr(args, scheduler)
    groups = []
    for wd_mult in (1.0, 0.0):  # Megatron's order: decayed parameters, then biases and norms
        group = dict(_GROUP_FLAGS, wd_mult=wd_mult, max_lr=scheduler.get("max_lr", lr),
                     min_lr=scheduler.get("min_lr", args.get("min_lr")), lr=lr,
                     betas=(args.get("adam_beta1", 0.9), args.get("adam_beta2", 0.999)),
                     eps=args.get("adam_eps", 1e-8), weight_decay=args.get("weight_decay", 0.01) * wd_mult)
        groups.append(group)  # no 'step': the non-distributed layout keeps it in common_step
    return groups


def common_state(common: dict, step: float | None, tp: int, pp: int) -> dict:
    """Megatron's `common_state` object from our checkpoint record."""
    args = dict(common["args"], consumed_train_samples=common["consumed_train_samples"],
                consumed_valid_samples=common["consumed_valid_samples"],
                skipped_train_samples=common["skipped_train_samples"], tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, ckpt_format="torch_dist")
    scheduler = common.get("opt_param_scheduler") or {}
    optimizer = {"param_groups": _param_groups(args, scheduler)}
    if step is not None:
        optimizer["state"] = {"common_step": torch.tensor(float(step))}
    if common.get("grad_scaler"):
        optimizer["grad_scaler"] = dict(common["grad_scaler"])
    return {"args": _namespace(args), "checkpoint_version": 3.0, "iteration": common["iteration"],
            "optimizer": optimizer, "opt_param_scheduler": scheduler,
            "num_floating_point_operations_so_far": common["num_floating_point_operations_so_far"],
            "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}


def megatron_state(model: dict, optimizer: dict, common: dict, tp: int = 1, pp: int = 1) -> dict:
    """The whole DCP state dict. `model`: our global name -> tensor (SwiGLU fc1 as [2·ffn, h]);
    `optimizer`: {'main'|'exp_avg'|'exp_avg_sq': {name: tensor}} (empty without optimizer);
    `optimizer['step']`: the Adam step count or None."""
    num_layers = int(common["args"]["num_layers"])
    state = stack_layers(model, num_layers)
    half = any(t.dtype in (torch.bfloat16, torch.float16) for t in model.values())
    for kind in ("exp_avg", "exp_avg_sq", "main"):
        if kind == "main" and not half:
            continue  # fp32 runs: the weight is the master copy (Megatron stores no fp32_param)
        name = "fp32_param" if kind == "main" else kind
        for key, t in stack_layers(optimizer.get(kind, {}), num_layers).items():
            state[f"optimizer.state.{name}.{key}"] = t.float()
    for module in _EXTRA_STATE:
        for layer in range(num_layers):
            state[f"{LAYERS}{module}._extra_state/shard_{layer}_{num_layers}"] = [None]
    state["common_state/shard_0_1"] = [common_state(common, optimizer.get("step"), tp, pp)]
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def write_megatron_checkpoint(root: str, state: dict, iteration: int) -> str:
    """Write `state` as `root/iter_XXXXXXX` in one process and point the tracker at it."""
    directory = iteration_dir(root, iteration)
    partial = directory + ".partial"
    os.makedirs(partial, exist_ok=True)
    # flatten_state_dict=False: each object entry stays one pickled value, as Megatron writes it.
    dcp.save(state, storage_writer=FileSystemWriter(partial),
             planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
    write_json(os.path.join(partial, METADATA), METADATA_CONTENT)
    os.replace(partial, directory)
    write_tracker(root, iteration)
    return directory

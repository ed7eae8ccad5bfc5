"""Single-process access to a torch_dist checkpoint as a *global state dict* (layout-free
names -> dense tensors): what conversion tools read and write. The files are the same ones a
distributed run writes (checkpoint/io.py), so a converted checkpoint loads at any TP/PP/DP.
"""
from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp

from megatron_lite.checkpoint.checksums import first_mismatch
from megatron_lite.checkpoint.layout import (
    COMMON,
    METADATA,
    METADATA_CONTENT,
    CheckpointError,
    check_complete,
    checkpoint_writer,
    iteration_dir,
    read_common,
    read_tracker,
    write_json,
    write_tracker,
)
from megatron_lite.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner
from megatron_lite.config.configs import ModelConfig

_STRIDED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


def _stride(key: str, swiglu: bool) -> int:
    # SwiGLU fc1 is stored as [2, ffn, ...] (checkpoint/sharded.py: stride parts on their own axis).
    return 2 if swiglu and key.endswith(_STRIDED) else 1


def to_stored(global_state: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in global_state.items():
        s = _stride(key, swiglu)
        out[f"model.{key}"] = t.unflatten(0, (s, -1)).contiguous() if s > 1 else t.contiguous()
    return out


def from_stored(stored: dict[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in stored.items():
        name = key[len("model."):]
        out[name] = t.flatten(0, 1) if _stride(name, swiglu) > 1 else t
    return out


def write_global_checkpoint(root: str, global_state: dict[str, torch.Tensor], cfg: ModelConfig,
                            args: dict, release: bool = True, iteration: int = 0) -> str:
    """Write a weights-only checkpoint (default: `release/`, loaded with finetune semantics)."""
    directory = iteration_dir(root, iteration, release)
    partial = directory + ".partial"
    os.makedirs(partial, exist_ok=True)
    dcp.save(to_stored(global_state, cfg.swiglu), storage_writer=checkpoint_writer(partial), no_dist=True)
    common = {"checkpoint_version": 3.0, "iteration": iteration, "consumed_train_samples": 0,
              "consumed_valid_samples": 0, "skipped_train_samples": 0,
              "num_floating_point_operations_so_far": 0.0, "tensor_model_parallel_size": 1,
              "pipeline_model_parallel_size": 1, "has_optimizer": False, "has_rng": False,
              "opt_param_scheduler": None, "grad_scaler": None, "rng_values": {}, "args": args}
    write_json(os.path.join(partial, COMMON), common)
    write_json(os.path.join(partial, METADATA), METADATA_CONTENT)
    os.replace(partial, directory)
    tracker = os.path.join(root, "latest_checkpointed_iteration.txt")
    with open(tracker + ".tmp", "w") as f:
        f.write("release" if release else str(iteration))
    os.replace(tracker + ".tmp", tracker)
    return directory


def _read_stored(root: str, ckpt_step: int | None, prefixes: tuple[str, ...]):
    """(stored tensors whose key starts with one of `prefixes`, common.json dict)."""
    found = read_tracker(root) if ckpt_step is None else (ckpt_step, False)
    if found is None:
        raise FileNotFoundError(f"{root}: no latest_checkpointed_iteration.txt (not a checkpoint directory?)")
    directory = iteration_dir(root, found[0], found[1])
    check_complete(directory)
    common = read_common(directory, required=("args",))
    corrupted = first_mismatch(directory)
    if corrupted:
        raise CheckpointError(corrupted)
    meta = SafeFileSystemReader(directory).read_metadata().state_dict_metadata
    stored = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
              for k, m in meta.items() if k.startswith(prefixes) and hasattr(m, "size")}
    dcp.load(stored, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner(), no_dist=True)
    return stored, common


def read_global_checkpoint(root: str, ckpt_step: int | None = None):
    """(global model state, common.json dict) of the checkpoint the tracker (or `ckpt_step`) names."""
    stored, common = _read_stored(root, ckpt_step, ("model.",))
    return from_stored(stored, bool(common["args"].get("swiglu"))), common


def read_global_training_state(root: str, ckpt_step: int | None = None):
    """(model, optimizer, common) of a whole checkpoint: `optimizer` maps 'main' / 'exp_avg' /
    'exp_avg_sq' to {global name: tensor} and 'step' to the Adam step (None without one)."""
    stored, common = _read_stored(root, ckpt_step, ("model.", "optimizer."))
    swiglu = bool(common["args"].get("swiglu"))
    model = from_stored({k: v for k, v in stored.items() if k.startswith("model.")}, swiglu)
    step = stored.get("optimizer.step")
    optimizer = {"step": None if step is None else float(step)}
    for kind in ("main", "exp_avg", "exp_avg_sq"):
        prefix = f"optimizer.{kind}."
        part = {"model." + k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
        optimizer[kind] = from_stored(part, swiglu)
    return model, optimizer, common


def write_global_training_state(root: str, model: dict, optimizer: dict, common: dict) -> str:
    """Write a whole training state (read_global_training_state's shape) as our checkpoint at
    `common['iteration']`, so a run resumes from it: weights, optimizer, scheduler, counters."""
    args = common["args"]
    swiglu = bool(args.get("swiglu"))
    state = to_stored(model, swiglu)
    for kind in ("main", "exp_avg", "exp_avg_sq"):
        for key, t in to_stored(optimizer.get(kind) or {}, swiglu).items():
            state[f"optimizer.{kind}.{key[len('model.'):]}"] = t.float()
    has_optimizer = optimizer.get("step") is not None and bool(optimizer.get("exp_avg"))
    if has_optimizer:
        state["optimizer.step"] = torch.tensor(float(optimizer["step"]))
    iteration = int(common["iteration"])
    directory = iteration_dir(root, iteration)
    partial = directory + ".partial"
    os.makedirs(partial, exist_ok=True)
    dcp.save(state, storage_writer=checkpoint_writer(partial), no_dist=True)
    record = {k: common[k] for k in ("checkpoint_version", "iteration", "consumed_train_samples",
                                     "consumed_valid_samples", "skipped_train_samples",
                                     "num_floating_point_operations_so_far", "tensor_model_parallel_size",
                                     "pipeline_model_parallel_size", "opt_param_scheduler", "grad_scaler")}
    record.update(has_optimizer=has_optimizer, has_rng=False, rng_values={}, args=args)
    write_json(os.path.join(partial, COMMON), record)
    write_json(os.path.join(partial, METADATA), METADATA_CONTENT)
    os.replace(partial, directory)
    write_tracker(root, iteration)
    return directory

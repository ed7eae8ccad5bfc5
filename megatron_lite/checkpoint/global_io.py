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


def read_global_checkpoint(root: str, ckpt_step: int | None = None):
    """(global model state, common.json dict) of the checkpoint the tracker (or `ckpt_step`) names."""
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
              for k, m in meta.items() if k.startswith("model.") and hasattr(m, "size")}
    dcp.load(stored, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner(), no_dist=True)
    return from_stored(stored, bool(common["args"].get("swiglu"))), common

"""A Megatron-LM `torch_dist` checkpoint's non-tensor state as megatron_lite's checkpoint
record (the dict `common.json` holds for our own checkpoints), so `--load`,
`--use-checkpoint-args` and the converter treat both formats alike (spec §4.3, §4.5).

Megatron keeps that state in `common_state` (a pickled object inside the DCP files, core_v0.19
and later) or `common.pt` (earlier); RNG states in `rng_state/shard_{pp}.{tp}_{PP}.{TP}`. All
are unpickled by `pickles.load_object` (no code runs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata

from megatron_lite.checkpoint.layout import COMMON, COMMON_KEYS, CheckpointError, check_complete, read_common
from megatron_lite.checkpoint.megatron.pickles import load_object, plain
from megatron_lite.checkpoint.safe_load import SafeFileSystemReader

LEGACY_COMMON = "common.pt"  # core_v0.18 and earlier (spec §4.3)
COMMON_STATE = "common_state"
RNG_STATE = "rng_state"


def is_megatron(directory: str) -> bool:
    """A torch_dist directory written by Megatron-LM: no `common.json`, but Megatron's common
    state (`common.pt` or a `common_state` entry in the DCP metadata)."""
    if os.path.isfile(os.path.join(directory, COMMON)):
        return False
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        return False
    if os.path.isfile(os.path.join(directory, LEGACY_COMMON)):
        return True
    return any(k.startswith(COMMON_STATE) for k in read_metadata(directory).state_dict_metadata)


def read_metadata(directory: str) -> Metadata:
    return SafeFileSystemReader(directory).read_metadata()


def read_bytes(directory: str, metadata: Metadata, prefix: str) -> dict[str, bytes]:
    """Raw bytes of the byte entries whose key starts with `prefix` (read, not unpickled)."""
    out = {}
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith(prefix):
            with open(os.path.join(directory, info.relative_path), "rb") as f:
                f.seek(info.offset)
                out[index.fqn] = f.read(info.length)
    return out


def _unwrap(obj):
    # A ShardedObject's value comes back wrapped in one list per prepended axis.
    while isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    return obj


def load_entry(directory: str, metadata: Metadata, key: str):
    """The unpickled object stored under byte entry `key` (e.g. `common_state/shard_0_1`)."""
    raw = read_bytes(directory, metadata, key)
    if key not in raw:
        raise CheckpointError(f"{directory}: Megatron checkpoint entry {key} is missing")
    return _unwrap(load_object(raw[key], f"{directory}/{key}"))


@dataclass
class MegatronRecord:
    """What a load needs from Megatron's pickled state. `common` has the keys of our
    `common.json` (layout.COMMON_KEYS); the rest describes the tensors' layout."""

    common: dict
    metadata: Metadata
    optimizer_common: dict = field(default_factory=dict)  # Megatron's common['optimizer']
    rng: dict = field(default_factory=dict)  # 'pp{p}.tp{t}' -> Megatron's per-rank RNG dict


def _common_state(directory: str, metadata: Metadata) -> dict:
    legacy = os.path.join(directory, LEGACY_COMMON)
    if os.path.isfile(legacy):
        with open(legacy, "rb") as f:
            return load_object(f.read(), legacy)
    keys = [k for k in metadata.state_dict_metadata if k.startswith(COMMON_STATE)]
    state = load_entry(directory, metadata, keys[0])
    if not isinstance(state, dict) or "args" not in state:
        raise CheckpointError(f"{directory}/{keys[0]}: not a Megatron common state (no args)")
    return state


def _rng_states(directory: str, metadata: Metadata) -> dict:
    """`rng_state/shard_{pp}.{tp}_{PP}.{TP}` -> {'pp{pp}.tp{tp}': first DP entry's dict}."""
    out = {}
    for key in metadata.state_dict_metadata:
        if not key.startswith(RNG_STATE + "/shard_"):
            continue
        coords = key.split("_")[-2].split(".")  # 'shard_{pp}.{tp}_{PP}.{TP}' -> [pp, tp]
        value = load_entry(directory, metadata, key)
        while isinstance(value, list):  # per-DP list with --data-parallel-random-init: DP rank 0's
            value = value[0]
        out[f"pp{coords[0]}.tp{coords[1]}"] = value
    return out


def _rng_values(state: dict) -> dict | None:
    """Our `rng_values` (checkpoint/rng.py) from Megatron's python/numpy states."""
    try:
        version, py_state, gauss = state["random_rng_state"]
        kind, _, pos, has_gauss, np_gauss = state["np_rng_state"]
        return {"python": [version, list(py_state), gauss],
                "numpy": [kind, int(pos), int(has_gauss), float(np_gauss)]}
    except (KeyError, TypeError, ValueError):
        return None


def read_record(directory: str) -> MegatronRecord:
    """Megatron's checkpoint state, translated to our record. One line on anything missing."""
    metadata = read_metadata(directory)
    state = _common_state(directory, metadata)
    args = plain(state["args"])
    # Megatron leaves add_position_embedding True under RoPE (the table is just not built);
    # ours says whether the table exists (config/validation.py), which is what loading checks.
    learned = args.get("position_embedding_type", "learned_absolute") == "learned_absolute"
    args["add_position_embedding"] = learned
    rng = _rng_states(directory, metadata)
    tensors = metadata.state_dict_metadata
    has_optimizer = any(k.startswith("optimizer.") for k in tensors)
    optimizer_common = state.get("optimizer") or {}
    common = {
        "checkpoint_version": state.get("checkpoint_version", 3.0),
        "iteration": int(state.get("iteration", 0)),
        "consumed_train_samples": int(args.get("consumed_train_samples") or 0),
        "consumed_valid_samples": int(args.get("consumed_valid_samples") or 0),
        "skipped_train_samples": int(args.get("skipped_train_samples") or 0),
        "num_floating_point_operations_so_far": float(state.get("num_floating_point_operations_so_far", 0.0)),
        "tensor_model_parallel_size": int(args.get("tensor_model_parallel_size", 1)),
        "pipeline_model_parallel_size": int(args.get("pipeline_model_parallel_size", 1)),
        "has_optimizer": has_optimizer,
        "has_rng": bool(rng),
        "opt_param_scheduler": plain(state.get("opt_param_scheduler")),
        "grad_scaler": plain(optimizer_common.get("grad_scaler")),
        "rng_values": {k: v for k, v in ((k, _rng_values(s)) for k, s in rng.items()) if v is not None},
        "args": args,
        "format": "megatron",
    }
    return MegatronRecord(common, metadata, optimizer_common, rng)


def rng_tensors(state: dict, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron's per-rank RNG dict as our RNG tensors (checkpoint/rng.py names), for the
    entries whose shape matches this run's (a CPU run cannot take a CUDA generator state)."""
    found = {"torch": state.get("torch_rng_state"), "cuda": state.get("cuda_rng_state")}
    for name, value in (state.get("rng_tracker_states") or {}).items():
        found[f"tracker.{name}"] = value
    keys = state.get("np_rng_state", (None, None))[1]
    if isinstance(keys, np.ndarray):
        found["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    out = {}
    for name, mine in template.items():
        theirs = found.get(name)
        if isinstance(theirs, torch.Tensor) and theirs.shape == mine.shape:
            out[name] = theirs.to(mine.dtype)
    return out


def read_any_record(directory: str,
                    required: tuple[str, ...] = COMMON_KEYS) -> tuple[dict, MegatronRecord | None]:
    """(record, Megatron details or None) of a complete checkpoint directory of either format:
    our `common.json`, or Megatron-LM's pickled common state translated to the same keys."""
    check_complete(directory, names=(".metadata",))
    if is_megatron(directory):
        megatron = read_record(directory)
        return megatron.common, megatron
    check_complete(directory)
    return read_common(directory, required), None

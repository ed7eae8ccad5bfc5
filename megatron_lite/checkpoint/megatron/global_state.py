"""A whole Megatron-LM `torch_dist` checkpoint as a *global training state* in one process:
our global names -> dense tensors for the model and the optimizer, plus our checkpoint
record. What `tools/checkpoint/convert.py --loader core` reads (the same mapping `--load`
applies per rank, reader.py)."""
from __future__ import annotations

import math

import torch

from megatron_lite.checkpoint.layout import CheckpointError, iteration_dir, read_tracker
from megatron_lite.checkpoint.megatron.keys import from_megatron
from megatron_lite.checkpoint.megatron.reader import adam_step, flat_key, flat_layout, is_distributed
from megatron_lite.checkpoint.megatron.record import MegatronRecord, read_any_record
from megatron_lite.checkpoint.megatron.regions import Region, read_regions

_PLAIN = {"exp_avg": "optimizer.state.exp_avg.", "exp_avg_sq": "optimizer.state.exp_avg_sq.",
          "main": "optimizer.state.fp32_param."}


def _model_keys(record: MegatronRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(m.size) for k, m in record.metadata.state_dict_metadata.items()
            if hasattr(m, "size") and not k.startswith("optimizer.")}


def _unstack(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if not key.startswith("decoder.layers."):
        return {from_megatron(key, None): tensor}
    return {from_megatron(key, i): tensor[i] for i in range(tensor.shape[0])}


def _read_keys(directory: str, record: MegatronRecord, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """{our prefix + Megatron key: whole tensor} for `keys` (Megatron key -> result key)."""
    tensors = record.metadata.state_dict_metadata
    out = {k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype) for k in keys}
    read_regions(directory, record.metadata, [Region(k, (0,) * t.dim(), t) for k, t in out.items()])
    return {keys[k]: t for k, t in out.items()}


def _flat_optimizer(directory: str, record: MegatronRecord) -> dict[str, dict[str, torch.Tensor]]:
    slots = flat_layout(record, directory)
    out = {kind: {} for kind in _PLAIN}
    for kind in _PLAIN:
        buckets = {}
        for (key, layer), slot in slots.items():
            if slot.bucket not in buckets:
                bucket_key = flat_key(record, slot.bucket, kind)
                buckets[slot.bucket] = _read_keys(directory, record, {bucket_key: bucket_key})[bucket_key]
            flat = buckets[slot.bucket]
            value = flat[slot.start:slot.start + math.prod(slot.shape)].view(slot.shape)
            out[kind][from_megatron(key, layer)] = value.clone()
    return out


def read_megatron_training_state(root: str, ckpt_step: int | None = None):
    """(model, optimizer, record) like global_io.read_global_training_state, from Megatron's files."""
    found = read_tracker(root) if ckpt_step is None else (ckpt_step, False)
    if found is None:
        raise FileNotFoundError(f"{root}: no latest_checkpointed_iteration.txt (not a checkpoint directory?)")
    directory = iteration_dir(root, found[0], found[1])
    common, record = read_any_record(directory)
    if record is None:
        raise CheckpointError(f"{directory}: not a Megatron-LM checkpoint (it has common.json: "
                              "use --loader lite)")
    model = {}
    for key, tensor in _read_keys(directory, record, {k: k for k in _model_keys(record)}).items():
        model.update(_unstack(key, tensor))
    optimizer = {"step": adam_step(record, directory) if common["has_optimizer"] else None}
    if common["has_optimizer"] and is_distributed(record):
        optimizer.update(_flat_optimizer(directory, record))
    elif common["has_optimizer"]:
        tensors = record.metadata.state_dict_metadata
        for kind, prefix in _PLAIN.items():
            keys = {prefix + k: k for k in _model_keys(record) if prefix + k in tensors}
            optimizer[kind] = {}
            for key, tensor in _read_keys(directory, record, keys).items():
                optimizer[kind].update(_unstack(key, tensor.float()))
        if not optimizer["main"]:  # fp32 run: the weights are the master copy
            optimizer["main"] = {k: v.float() for k, v in model.items()}
    return model, optimizer, common

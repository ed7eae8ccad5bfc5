"""Loading a Megatron-LM `torch_dist` checkpoint into any megatron_lite layout (spec §4.3).

`fill_state` takes the load state dict `checkpoint/io.py` builds for our own format
(`model.<name>`, `optimizer.{main,exp_avg,exp_avg_sq}.<name>`, `optimizer.step`, `rng.*`:
DTensors over the TP mesh, or plain tensors) and fills it from Megatron's keys instead:

* weights: `keys.to_megatron` names the stacked key and layer; each rank reads its own TP
  block (SwiGLU's `[2, ffn, h]` parts are rows `[0, ffn)` and `[ffn, 2·ffn)` of Megatron's fc1);
* optimizer, plain or `fully_reshardable`: `optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<key>`
  shaped like the weight (fp32 runs keep no fp32_param: the weight is the master copy);
* optimizer, distributed (`dp_reshardable`): one flat fp32 buffer per bucket holding
  param/exp_avg/exp_avg_sq of every parameter in the reverse of Megatron's parameter order,
  each parameter starting at a multiple of 64 (spec §8.1); offsets are rebuilt from the
  stacked keys' shapes and checked against the recorded unpadded bucket sizes;
* the Adam step from the optimizer's param groups (or `common_step`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_lite.checkpoint.layout import CheckpointError
from megatron_lite.checkpoint.megatron.keys import megatron_order, to_megatron
from megatron_lite.checkpoint.megatron.record import MegatronRecord, load_entry, rng_tensors
from megatron_lite.checkpoint.megatron.regions import Region, read_regions

_MOMENTS = ("exp_avg", "exp_avg_sq")
_DISTOPT = "optimizer.distributed.dp_group_idx_0."


def _local_block(value) -> tuple[tuple[int, ...], torch.Tensor]:
    """(global offset, local tensor) of one entry: a DTensor over the TP mesh, or the 2-D
    (tp, dp-cp) mesh of FSDP2 (checkpoint/fsdp_state.py), or a plain tensor held whole."""
    if not isinstance(value, DTensor):
        return (0,) * value.dim(), value
    _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    return tuple(offsets), value.to_local()


def _blocks(value, megatron_ndim: int) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Blocks in Megatron's (unstacked) shape: a strided `[parts, n, ...]` entry, one more
    dim than Megatron's, becomes `parts` blocks of rows `[j·n + o, ...]`."""
    offsets, local = _local_block(value)
    if value.dim() != megatron_ndim + 1:
        return [(offsets, local)]
    n = value.shape[1]
    # The part axis is never sharded (checkpoint/sharded.py): every rank holds all parts.
    return [((j * n + offsets[1], *offsets[2:]), local[j]) for j in range(local.shape[0])]


def _stored_ndim(record: MegatronRecord, key: str, layer) -> int:
    size = record.metadata.state_dict_metadata[key].size
    return len(size) - (1 if layer is not None else 0)


def _weight_key(record: MegatronRecord, name: str):
    """(Megatron key, layer) of our parameter `name`, trying the unfused norm name too."""
    key = to_megatron(name)
    tensors = record.metadata.state_dict_metadata
    if key.name not in tensors and key.unfused_name in tensors:
        return key.unfused_name, key.layer
    if key.name not in tensors:
        raise CheckpointError(f"the Megatron checkpoint has no tensor for {name} (looked for {key.name})")
    return key.name, key.layer


def _regions_for(record: MegatronRecord, key: str, layer, value) -> list[Region]:
    out = []
    for offsets, local in _blocks(value, _stored_ndim(record, key, layer)):
        if layer is None:
            out.append(Region(key, offsets, local))
        else:
            out.append(Region(key, (layer, *offsets), local.unsqueeze(0)))
    return out


def _plain_optimizer_key(record: MegatronRecord, kind: str, name: str) -> tuple[str, int | None]:
    key, layer = _weight_key(record, name)
    if kind == "main":
        fp32 = f"optimizer.state.fp32_param.{key}"
        return (fp32 if fp32 in record.metadata.state_dict_metadata else key), layer
    return f"optimizer.state.{kind}.{key}", layer


def _split_key(key: str) -> tuple[str, str] | None:
    """'optimizer.exp_avg.<name>' -> ('exp_avg', name); 'model.<name>' -> ('model', name)."""
    if key.startswith("model."):
        return "model", key[len("model."):]
    for kind in ("main", *_MOMENTS):
        if key.startswith(f"optimizer.{kind}."):
            return kind, key[len(f"optimizer.{kind}."):]
    return None


def is_distributed(record: MegatronRecord) -> bool:
    return any(k.startswith(_DISTOPT) for k in record.metadata.state_dict_metadata)


@dataclass(frozen=True)
class _FlatSlot:
    bucket: int
    start: int  # element offset inside the bucket's flat buffer
    shape: tuple[int, ...]  # the parameter's (unstacked) global shape


def _bucket_sizes(record: MegatronRecord, directory: str) -> list[int]:
    prefix = _DISTOPT + "per_bucket_numel_unpadded"
    entry = next(k for k in record.metadata.state_dict_metadata if k.startswith(prefix))
    per_dtype = load_entry(directory, record.metadata, entry)  # {(param dtype, grad dtype): [n per bucket]}
    if not isinstance(per_dtype, dict) or len(per_dtype) != 1:
        raise CheckpointError(f"{directory}: distributed-optimizer state with several gradient buffers "
                              "(mixed parameter dtypes) is not supported; load with --no-load-optim")
    return [int(n) for n in next(iter(per_dtype.values()))]


def flat_layout(record: MegatronRecord, directory: str) -> dict[tuple[str, int | None], _FlatSlot]:
    """Where each parameter sits in the distributed optimizer's flat buckets (spec §8.1):
    reverse parameter order, starts padded to 64 elements, buckets closed at their recorded
    unpadded sizes."""
    args = record.common["args"]
    tp, pp = args.get("tensor_model_parallel_size", 1), args.get("pipeline_model_parallel_size", 1)
    if tp > 1 or pp > 1:
        raise CheckpointError(
            f"{directory}: Megatron saved this distributed-optimizer state at TP={tp}, PP={pp} in per-rank "
            "flat buffers, which we only read for TP=PP=1; load with --no-load-optim, or resume once in "
            "Megatron with --dist-ckpt-optim-fully-reshardable and save")
    tensors = record.metadata.state_dict_metadata
    names = [k for k, m in tensors.items()
             if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")]
    sizes, slots, bucket, pos = _bucket_sizes(record, directory), {}, 0, 0
    for key, layer in reversed(megatron_order(names, int(args["num_layers"]))):
        shape = tuple(tensors[key].size)[1 if layer is not None else 0:]
        start = math.ceil(pos / 64) * 64
        if bucket >= len(sizes) or start + math.prod(shape) > sizes[bucket]:
            raise CheckpointError(f"{directory}: the distributed-optimizer buckets {sizes} do not match the "
                                  "model's parameters; load with --no-load-optim")
        slots[(key, layer)] = _FlatSlot(bucket, start, shape)
        pos = start + math.prod(shape)
        if pos == sizes[bucket]:
            bucket, pos = bucket + 1, 0
    return slots


def flat_key(record: MegatronRecord, bucket: int, kind: str) -> str:
    suffix = f".bucket_idx_{bucket}.{'param' if kind == 'main' else kind}"
    for key in record.metadata.state_dict_metadata:
        if key.startswith(_DISTOPT + "gbuf_idx_0.") and key.endswith(suffix):
            return key
    raise CheckpointError(f"the Megatron checkpoint has no distributed-optimizer entry *{suffix}")


def adam_step(record: MegatronRecord, directory: str) -> float | None:
    groups = record.optimizer_common.get("param_groups")
    step = (record.optimizer_common.get("state") or {}).get("common_step")
    entries = record.metadata.state_dict_metadata
    entry = next((k for k in entries if k.startswith(_DISTOPT + "optimizer/")), None)
    if entry is not None:
        groups = load_entry(directory, record.metadata, entry).get("param_groups")
    if step is None and groups:
        step = groups[0].get("step")
    return None if step is None else float(step)


def _flat_fill(record: MegatronRecord, directory: str, flat: list) -> None:
    """Read each (kind, name, value)'s whole flat range into a temporary, then copy this
    rank's blocks out. Read in batches so temporaries stay under ~1 GiB."""
    slots = flat_layout(record, directory)
    batch, size = [], 0
    for i, (kind, name, value) in enumerate(flat):
        slot = slots[_weight_key(record, name)]
        temp = torch.empty(math.prod(slot.shape), dtype=torch.float32)
        batch.append((Region(flat_key(record, slot.bucket, kind), (slot.start,), temp), slot.shape, value))
        size += temp.numel() * 4
        if size > (1 << 30) or i == len(flat) - 1:
            read_regions(directory, record.metadata, [r for r, _, _ in batch])
            for region, shape, value in batch:
                full = region.dest.view(shape)
                for offsets, local in _blocks(value, len(shape)):
                    local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))])
            batch, size = [], 0


def fill_state(directory: str, record: MegatronRecord, state: dict, rng_prefix: str) -> None:
    """Fill our load state dict (see module docstring) from Megatron checkpoint `directory`."""
    regions, flat = [], []
    distributed = is_distributed(record)
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            continue
        kind, name = split
        if kind != "model" and distributed:
            flat.append((kind, name, value))
            continue
        if kind == "model":
            mkey, layer = _weight_key(record, name)
        else:
            mkey, layer = _plain_optimizer_key(record, kind, name)
        regions += _regions_for(record, mkey, layer, value)
    read_regions(directory, record.metadata, regions)
    if flat:
        _flat_fill(record, directory, flat)
    if "optimizer.step" in state:
        step = adam_step(record, directory)
        if step is None:
            raise CheckpointError(f"{directory}: the Megatron checkpoint records no optimizer step count")
        state["optimizer.step"].fill_(step)
    rng_keys = {k[len(rng_prefix):]: v for k, v in state.items() if k.startswith(rng_prefix)}
    if rng_keys:
        coords = rng_prefix.split(".")[1:3]  # 'rng.pp0.tp0.' -> ['pp0', 'tp0']
        found = rng_tensors(record.rng.get(".".join(coords), {}), rng_keys)
        for name, tensor in found.items():
            rng_keys[name].copy_(tensor)


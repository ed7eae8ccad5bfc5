"""Sharded state dicts: every tensor described by its global key, global shape and this
rank's slice, as DTensors over the tensor-parallel mesh (spec §4.3).

Keys never mention the layout: parameters use their global names (`models/gpt.py`
`global_name`), so `torch.distributed.checkpoint` can load any TP/PP/DP layout from any
other. TP-sharded tensors are `Shard(partition_dim)`; a tensor made of `stride` stacked parts
(SwiGLU fc1 = [gate; up]) is stored as `[stride, n, ...]` sharded on the part axis, which is
exactly how each TP rank holds it. Replicated tensors are `Replicate()`; DP replicas and the
duplicate tied head write once (DCP deduplicates equal keys and offsets).
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatron_lite.checkpoint.fsdp_state import fsdp_model_state


def build_tp_mesh(ps, device_type: str) -> DeviceMesh:
    """The 1-D mesh of this rank's TP group. Only the DTensors' global shapes and offsets come
    from it (DCP runs its collectives on its own group, and nothing here redistributes), so it
    gets no process groups of its own: init_device_mesh would build two per call (NCCL
    communicators on GPUs) that nothing destroys."""
    return DeviceMesh(device_type, torch.tensor(ps.ranks["tp"]), mesh_dim_names=("tp",), _init_backend=False)


def wrap(tensor: torch.Tensor, param: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """View `tensor` (laid out like `param`'s local shard) as a DTensor over the TP mesh."""
    if getattr(param, "tensor_model_parallel", False):
        dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
        if stride > 1:
            tensor = tensor.unflatten(dim, (stride, -1))  # [.., stride, n/tp, ..]: a view
            dim += 1
        return DTensor.from_local(tensor, mesh, [Shard(dim)], run_check=False)
    return DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)


def model_items(models) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of every chunk, each global name once."""
    out, seen = [], set()
    for model in models:
        model = getattr(model, "module", model)  # a DistributedDataParallel chunk wraps the GPTModel
        for name, param in model.named_parameters():
            key = model.global_name(name)
            if key not in seen:  # a rank never holds both copies of the tied embedding, but be safe
                seen.add(key)
                out.append((key, param))
    return out


def model_state(models, mesh: DeviceMesh, for_load: bool = False) -> dict[str, DTensor]:
    """`model.<global name>` entries of every chunk; an FSDP2 chunk (`--use-torch-fsdp2`)
    describes its own 2-D shards (fsdp_state.py)."""
    sharded = [m for m in models if getattr(m, "fully_sharded", False)]
    out = {}
    for chunk in sharded:
        out.update(fsdp_model_state(chunk, for_load))
    plain = [m for m in models if not getattr(m, "fully_sharded", False)]
    out.update({f"model.{key}": wrap(p.data, p, mesh) for key, p in model_items(plain)})
    return out


def local_params(models) -> list[torch.Tensor]:
    """Every parameter's local tensor: a DTensor (FSDP2 shard) gives this rank's part."""
    return [p.to_local() if isinstance(p, DTensor) else p for m in models for p in m.parameters()]

"""Checkpoint entries of an FSDP2-sharded chunk (`--use-torch-fsdp2`, data_parallel/fsdp.py) and
of its optimizer, under the same global keys, shapes and dtypes as every other layout
(sharded.py, optim_state.py): an FSDP2 checkpoint loads into DDP or the distributed optimizer
at any TP/DP, and the other way round.

A rank holds its FSDP2 shard (along `fsdp_shard_dim`) of its TP shard. As a DTensor that is a
2-D placement over a (tp, dp-cp) mesh: the TP placement of `sharded.wrap`, then `Shard(fsdp
dim)` over the DP×CP ranks. TP comes first in the mesh because a parameter TP-split on dim 0
and FSDP-sharded on dim 0 is cut by TP first and then by FSDP, which is what the nested
`[Shard(0), Shard(0)]` means in mesh order; uneven FSDP shards follow `torch.chunk` in both.
The mesh is built without process groups: DCP only reads its coordinates.

Loading writes the model entries straight into the fp32 shards (the master weights; DCP casts
a bf16 checkpoint value on copy) and the optimizer's `main` entries into scratch tensors that
`finish_load` copies over them, so full-precision mains win whenever they are loaded.
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard


def checkpoint_mesh(ps, device_type: str) -> DeviceMesh:
    """The (tp, dp-cp) mesh of this layout (pipeline parallelism is refused with FSDP2): row t
    holds the ranks of TP rank t in the order of the DP×CP group FSDP2 shards over."""
    offset = [r - ps.rank for r in ps.ranks["tp"]]  # TP neighbours differ by a constant
    ranks = torch.tensor([[r + o for r in ps.ranks["dp-cp"]] for o in offset])  # [tp, dp*cp]
    return DeviceMesh(device_type, ranks, mesh_dim_names=("tp", "dp_cp"), _init_backend=False)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def wrap_shard(local: torch.Tensor, param, mesh: DeviceMesh) -> DTensor:
    """View `local` (laid out like `param`'s FSDP2 shard) as a DTensor of the global tensor."""
    dim, shape = param.fsdp_shard_dim, list(param.shape)  # shape: the TP-local tensor
    if getattr(param, "tensor_model_parallel", False):
        d, stride = param.partition_dim, getattr(param, "partition_stride", 1)
        if stride > 1:  # [.., stride, n/tp, ..], as sharded.wrap; FSDP2 never cuts dim d then
            local = local.unflatten(d, (stride, -1))
            shape[d:d + 1] = [stride, shape[d] // stride]
            if dim > d:
                dim += 1
            d += 1
        shape[d] *= mesh.size(0)
        placements = [Shard(d), Shard(dim)]
    else:
        placements = [Replicate(), Shard(dim)]
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def fsdp_model_state(chunk, for_load: bool) -> dict[str, DTensor]:
    """`model.<global name>` entries of an FSDP2 chunk: the fp32 shards themselves to load
    into; for saving, their copies in the model dtype (what every other layout writes)."""
    module, out = chunk.module, {}
    dtype, mesh = module.config.params_dtype, checkpoint_mesh(chunk.ps, chunk.device.type)
    for name, p in module.named_parameters():
        local = p.to_local().detach()
        if not for_load and local.dtype != dtype:
            local = local.to(dtype)
        out[f"model.{module.global_name(name)}"] = wrap_shard(local, p, mesh)
    return out


class FSDPOptimizerState:
    """The optimizer entries of a FullyShardedOptimizer (see optim_state.OptimizerCheckpoint)."""

    def __init__(self, optimizer, keys: tuple[str, ...], names: dict[int, str], ensure_state):
        self.opt, self.keys, self.names, self.ensure_state = optimizer, keys, names, ensure_state
        chunk = optimizer.chunks[0]
        self.mesh = checkpoint_mesh(chunk.ps, chunk.device.type)
        self._scratch = []  # (main shard, loaded fp32 values) to copy after a load

    def entries(self, for_load: bool) -> dict:
        out, inner = {}, self.opt.inner
        for p, main in zip(self.opt.params, self.opt.main_params):
            key = self.names[id(p)]
            state = self.ensure_state(inner, main, self.keys) if for_load else inner.state.get(main, {})
            target = main
            if for_load:
                target = torch.empty_like(main)
                self._scratch.append((main, target))
            out[f"optimizer.main.{key}"] = wrap_shard(target, p, self.mesh)
            for k in self.keys:
                if k in state:
                    out[f"optimizer.{k}.{key}"] = wrap_shard(state[k], p, self.mesh)
        return out

    @torch.no_grad()
    def finish_load(self) -> None:
        for main, loaded in self._scratch:
            main.copy_(loaded)
        self._scratch.clear()

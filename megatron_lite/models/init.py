"""Layout-independent parameter initialization and gathering of global tensors.

Every parameter is generated as its *global* tensor from a generator seeded by (seed, global
name), then this rank's tensor-parallel shard is cut out of it. The same `--seed` therefore
gives the same global weights for any TP/PP/DP layout (DESIGN rule 3), and tied copies on
different pipeline stages start equal without a broadcast.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from megatron_lite.tensor_parallel.sharding import shard, unshard

# Residual-output projections use std / sqrt(2L) (spec §10, `--init-method-std`).
_SCALED_INIT = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _param_seed(seed: int, global_name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(global_name.encode())) % (2**63)


def global_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _initial_value(name: str, shape, std: float, num_layers: int, generator, device) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, device=device)
    if name.endswith(_SCALED_INIT):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_parameter(param: torch.nn.Parameter, global_name: str, seed: int, std: float, num_layers: int,
                   tp_rank: int, tp_size: int, cpu_init: bool = False) -> None:
    """Fill `param` with this rank's tensor-parallel shard of its global initial tensor, drawn
    from a generator seeded by (seed, global name): N(0, std), std / sqrt(2L) for residual
    outputs, zeros for biases."""
    draw_on = torch.device("cpu") if cpu_init else param.device
    generator = torch.Generator(device=draw_on)
    generator.manual_seed(_param_seed(seed, global_name))
    value = _initial_value(global_name, global_shape(param, tp_size), std, num_layers, generator,
                           draw_on).to(param.device)
    if getattr(param, "tensor_model_parallel", False):
        value = shard(value, param.partition_dim, tp_rank, tp_size, getattr(param, "partition_stride", 1))
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def init_model_parameters(model, seed: int, std: float, num_layers: int, tp_rank: int, tp_size: int,
                          embedding_std: float | None = None, cpu_init: bool = False):
    """Initialize `model` (a GPTModel chunk) in place from global tensors. `embedding_std`
    (`--embedding-init-method-std`) replaces `std` for the word and position embeddings.
    `cpu_init` (`--use-cpu-initialization`) draws every value with a CPU generator and copies it
    to the parameter's device: CPU and CUDA generators give different numbers for one seed, so
    this makes a GPU run start from exactly the weights of a CPU run."""
    for name, param in model.named_parameters():
        gname = model.global_name(name)
        if "layernorm" in gname:
            continue  # norms own their init (gamma 1, or 0 when stored zero-centred)
        own_std = std
        if embedding_std is not None and gname.startswith("embedding."):
            own_std = embedding_std
        init_parameter(param, gname, seed, own_std, num_layers, tp_rank, tp_size, cpu_init)
    for module in model.modules():
        if module.__class__.__name__ == "Norm":
            module.reset_parameters()


def gather_global(model, tp_group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Global name -> full (TP-gathered) parameter or gradient tensor, on CPU in fp32.
    Collective over the TP group; used by tests, checkpoint conversion and HF export."""
    out = {}
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    for name, param in model.named_parameters():
        t = (getattr(param, "main_grad", None) if grads else param.data)
        if grads and t is None:
            t = param.grad
        if t is None:
            continue
        if getattr(param, "tensor_model_parallel", False) and world > 1:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = unshard(parts, param.partition_dim, getattr(param, "partition_stride", 1))
        out[model.global_name(name)] = t.detach().float().cpu().clone()
    return out

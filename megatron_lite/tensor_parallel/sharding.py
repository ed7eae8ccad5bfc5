"""How a global (dense) tensor maps onto tensor-parallel shards, and the parameter tags that say so.

`partition_stride` follows Megatron: along `dim` the global tensor is made of `stride` equal
parts (e.g. SwiGLU's fc1 weight is `[gate; up]`, stride 2); each part is split into `world`
chunks and a rank's shard is the concatenation of its chunk of every part. Then the local
GEMM output is `[gate_r; up_r]` and the activation can split it locally.

Model initialization generates every global weight and calls `shard` with the tags below, so
the same seed gives the same global model for any TP size (DESIGN rule 3); checkpointing and
parity tests use the same tags and `unshard`.
"""
from __future__ import annotations

import torch


def _check(size: int, dim: int, world: int, stride: int) -> None:
    if world < 1 or stride < 1:
        raise ValueError(f"world ({world}) and stride ({stride}) must be positive")
    if size % (world * stride):
        raise ValueError(f"dimension {dim} of size {size} cannot be split into {stride} part(s) "
                         f"of {world} shard(s) each")


def shard(global_tensor: torch.Tensor, dim: int, rank: int, world: int, stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of `global_tensor` along `dim`: size `n/world` there, a new tensor.

    A fresh contiguous tensor (never a view) so that keeping a shard does not keep the whole
    global tensor alive.
    """
    _check(global_tensor.size(dim), dim, world, stride)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    chunk = global_tensor.size(dim) // (world * stride)
    part = global_tensor.size(dim) // stride
    pieces = [global_tensor.narrow(dim, p * part + rank * chunk, chunk) for p in range(stride)]
    if stride == 1:
        return pieces[0].clone(memory_format=torch.contiguous_format)
    return torch.cat(pieces, dim)


def unshard(locals: list, dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: the global tensor from the shards of ranks 0..world-1, in order."""
    world = len(locals)
    if world == 0:
        raise ValueError("unshard needs at least one shard")
    _check(locals[0].size(dim) * world, dim, world, stride)
    per_part = [t.chunk(stride, dim) for t in locals]  # per_part[rank][part]
    return torch.cat([per_part[r][p] for p in range(stride) for r in range(world)], dim)


def mark_parallel(param: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """Tag `param` as split over TP along `dim` (with `stride` parts); returns it."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride
    return param


def mark_sequence_parallel(param: torch.Tensor) -> torch.Tensor:
    """Tag a TP-replicated `param` whose gradient must be summed over TP when sequence
    parallelism is on (each rank only sees its sequence chunk): norms, row-parallel biases."""
    param.sequence_parallel = True
    return param

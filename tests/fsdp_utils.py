"""The FSDP2 counterparts of tests/dp_utils.py: a tiny GPT sharded with `--use-torch-fsdp2`'s
wrapper and optimizer, trained through the real `train_step`, and its global weights."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.data_parallel.fsdp import FSDPConfig, FullyShardedChunk
from megatron_lite.optimizer.core import OptimizerConfig
from megatron_lite.optimizer.fsdp import FullyShardedOptimizer
from megatron_lite.tensor_parallel.sharding import unshard
from megatron_lite.training.train_step import train_step
from tests.dp_utils import CPU, micro_batches, num_microbatches
from tests.model_utils import build, tiny_config


def build_fsdp(ps, model_kw: dict | None = None, fsdp_kw: dict | None = None, family: str = "gpt",
               opt_kw: dict | None = None):
    """(model, FSDP chunk, optimizer) for this rank."""
    cfg = tiny_config(family, sequence_parallel=ps.tp_size > 1, **(model_kw or {}))
    model = build(cfg, ps)
    chunk = FullyShardedChunk(model, ps, FSDPConfig(compute_dtype=cfg.params_dtype, **(fsdp_kw or {})))
    ocfg = OptimizerConfig(**{"lr": 1e-3, "clip_grad": 1.0, **(opt_kw or {})})
    return model, chunk, FullyShardedOptimizer([chunk], ocfg, ps)


def gather_fsdp_global(model, ps) -> dict[str, torch.Tensor]:
    """Global name -> full fp32 parameter on CPU: all-gathered over DP×CP (FSDP2), then TP."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor()  # the TP-local tensor
        if getattr(p, "tensor_model_parallel", False) and ps.tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
            t = unshard(parts, p.partition_dim, getattr(p, "partition_stride", 1))
        out[model.global_name(name)] = t.detach().float().cpu().clone()
    return out


def train_fsdp(ps, model_kw: dict | None = None, fsdp_kw: dict | None = None, steps: int = 3,
               family: str = "gpt", opt_kw: dict | None = None):
    """`steps` optimizer steps; returns (losses, grad norms, global params in fp32) like
    tests/dp_utils.train."""
    model, chunk, opt = build_fsdp(ps, model_kw, fsdp_kw, family, opt_kw)
    data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
    losses, norms = [], []
    for _ in range(steps):
        r = train_step(chunk, opt, data, num_microbatches(ps), ps, CPU)
        losses.append((r.loss_sum_count[0] / r.loss_sum_count[1]).item())
        norms.append(r.grad_norm.item())
    return losses, norms, gather_fsdp_global(model, ps)

"""Shared pieces of the data-parallel and optimizer tests: layout-independent micro-batches and a
tiny GPT wrapped in DDP with its optimizer, trained through the real `train_step`."""
from __future__ import annotations

import torch

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.models.init import gather_global
from megatron_lite.optimizer.core import OptimizerConfig
from megatron_lite.optimizer.distributed import DistributedOptimizer
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer
from megatron_lite.training.train_step import train_step
from tests.model_utils import build, tiny_config

GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 1, 16
CPU = torch.device("cpu")


def micro_batches(vocab: int, dp_rank: int, dp_size: int, seed: int = 7):
    """Sample k: a run of consecutive ids from a start drawn from (seed, k), learnable and
    independent of the layout; micro-step j of `MICRO_BATCH * DP` samples gives DP rank r its
    slots `[r*b, (r+1)*b)` (spec §2.11), so a global batch is the same samples for any DP."""
    k = 0
    while True:
        ids = [k + dp_rank * MICRO_BATCH + i for i in range(MICRO_BATCH)]
        starts = [int(torch.randint(vocab, (1,), generator=torch.Generator().manual_seed(seed * 100_003 + i)))
                  for i in ids]
        text = torch.stack([(s + torch.arange(SEQ + 1)) % vocab for s in starts])  # [b, s+1]
        yield {"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": torch.ones(len(ids), SEQ),
               "position_ids": torch.arange(SEQ).expand(len(ids), SEQ)}
        k += MICRO_BATCH * dp_size


def num_microbatches(ps) -> int:
    return GLOBAL_BATCH // (MICRO_BATCH * ps.dp_size)


def build_trainable(ps, ddp_kw: dict, model_kw: dict | None = None, opt_kw: dict | None = None,
                    scaler=None, family: str = "gpt", offload=None):
    """(model, ddp, optimizer) for this rank: the optimizer is the distributed one when
    `ddp_kw` asks for it; `offload`: an optimizer.cpu_offload.OffloadConfig."""
    cfg = tiny_config(family, sequence_parallel=ps.tp_size > 1, **(model_kw or {}))
    model = build(cfg, ps)
    ddp = DistributedDataParallel(model, ps, DDPConfig(**ddp_kw))
    ocfg = OptimizerConfig(**{"lr": 1e-3, "clip_grad": 1.0, **(opt_kw or {})})
    if ddp_kw.get("use_distributed_optimizer"):
        opt = DistributedOptimizer([ddp], ocfg, ps, scaler, offload=offload)
    else:
        opt = MixedPrecisionOptimizer(model.named_parameters(), ocfg, ps, scaler, offload=offload)
    return model, ddp, opt


def train(ps, ddp_kw: dict, model_kw: dict | None = None, opt_kw: dict | None = None, steps: int = 3,
          family: str = "gpt", offload=None):
    """`steps` optimizer steps; returns (losses, grad norms, global params in fp32)."""
    model, ddp, opt = build_trainable(ps, ddp_kw, model_kw, opt_kw, family=family, offload=offload)
    data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
    losses, norms = [], []
    for _ in range(steps):
        r = train_step(ddp, opt, data, num_microbatches(ps), ps, CPU)
        losses.append((r.loss_sum_count[0] / r.loss_sum_count[1]).item())
        norms.append(r.grad_norm.item())
    ddp.finish_param_sync()
    return losses, norms, gather_global(model, ps.tp_group)

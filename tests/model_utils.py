"""Tiny model configurations and a one-step runner shared by the model tests."""
from __future__ import annotations

import torch

from megatron_lite.config.configs import ModelConfig
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.data_parallel.finalize import finalize_grads
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.init import gather_global, init_model_parameters


def tiny_config(family: str, **overrides) -> ModelConfig:
    common = dict(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=128,
                  max_position_embeddings=32, attention_dropout=0.0, hidden_dropout=0.0,
                  attention_backend="auto")
    if family == "gpt":
        cfg = dict(common)
    elif family == "llama":
        cfg = dict(common, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                   add_bias_linear=False, untie_embeddings_and_output_weights=True,
                   num_query_groups=4, ffn_hidden_size=96)
    else:
        raise ValueError(family)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def tiny_batch(cfg: ModelConfig, batch: int = 2, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # tokens, labels: [b, s]


def build(cfg: ModelConfig, ps, seed: int = 1234, device="cpu"):
    tracker = build_rng_tracker(seed, ps.tp_rank, ps.pp_rank, device)
    model = GPTModel(cfg, ps, rng_tracker=tracker, device=device)
    init_model_parameters(model, seed, cfg.init_method_std, cfg.num_layers, ps.tp_rank, ps.tp_size,
                          embedding_std=cfg.embedding_init_method_std)
    return model


def one_step(cfg: ModelConfig, ps, seed: int = 1234):
    """Forward + backward of a tiny batch. Returns (global logits, loss, global grads)."""
    model = build(cfg, ps, seed)
    ddp = DistributedDataParallel(model, ps, DDPConfig())
    tokens, labels = tiny_batch(cfg)
    with torch.no_grad():
        logits = model(tokens)  # [b, s, V/tp]
    if ps.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(ps.tp_size)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.tp_group)
        logits = torch.cat(parts, dim=-1)
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    finalize_grads([ddp], ps)
    grads = gather_global(model, ps.tp_group, grads=True)
    return logits, loss.detach(), grads


def dense_reference(cfg: ModelConfig, data, m_global: int, seed: int = 1234):
    """The single-process reference of the parity tests: one model, `m_global` micro-batches
    of `data` back-propagated as loss_sum / tokens / M (spec §6.4). Returns (summed [loss
    sum, tokens], per-micro-batch [loss sum, tokens], gradients by global name)."""
    ps = ParallelState.create()
    model = GPTModel(cfg, ps, rng_tracker=build_rng_tracker(seed, 0, 0, "cpu"))
    init_model_parameters(model, seed, cfg.init_method_std, cfg.num_layers, 0, 1)
    totals, per_mb = torch.zeros(2), []
    for _ in range(m_global):
        batch = next(data)
        losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])  # [b, s]
        loss_sum, count = (losses * batch["loss_mask"]).sum(), batch["loss_mask"].sum()
        (loss_sum / count / m_global).backward()
        per_mb.append(torch.stack([loss_sum.detach(), count]))
        totals += per_mb[-1]
    grads = {model.global_name(n): p.grad.clone() for n, p in model.named_parameters()}
    return totals, per_mb, grads


def pipeline_step(cfg: ModelConfig, ps, channels, *, vpp: int | None = 1, ddp_config: DDPConfig | None = None,
                  seq: int = 16, micro: int = 2, num_microbatches: int = 4, seed: int = 1234,
                  loss_chunk_limits=None):
    """One forward-backward of `num_microbatches` mock micro-batches through the pipeline
    executor and DDP: (loss totals summed over DP, global grads by name). `loss_chunk_limits`
    (models/output_loss.ChunkLimits) replaces the chunks' default, e.g. to force chunking."""
    import torch.distributed as dist

    from megatron_lite.data.mock import MockTokens
    from megatron_lite.data.samplers import micro_batch_iterator
    from megatron_lite.pipeline_parallel.chunks import build_model_chunks
    from megatron_lite.pipeline_parallel.executor import PipelineConfig, PipelineExecutor
    from megatron_lite.pipeline_parallel.layout import build_layout
    from megatron_lite.training.train_step import forward_backward

    tracker = build_rng_tracker(seed, ps.tp_rank, ps.pp_rank, "cpu")
    chunks = build_model_chunks(cfg, ps, build_layout(cfg.num_layers, ps.pp_size, vpp), seed, tracker)
    if loss_chunk_limits is not None:
        for c in chunks:
            c.loss_chunk_limits = loss_chunk_limits
    ddp = [DistributedDataParallel(c, ps, ddp_config or DDPConfig()) for c in chunks]
    executor = PipelineExecutor(ddp, ps, PipelineConfig(), channels)
    data = micro_batch_iterator(MockTokens(64, seq, 128, seed), 0, micro, ps.dp_rank, ps.dp_size)
    for c in ddp:
        c.zero_grad_buffer()
    executor.train()
    totals = forward_backward(executor, data, num_microbatches, ps).totals
    finalize_grads(ddp, ps)
    if ps.dp_size > 1:
        dist.all_reduce(totals, group=ps.dp_cp_group)
    grads = {}
    for c in chunks:
        grads.update(gather_global(c, ps.tp_group, grads=True))
    return totals, grads

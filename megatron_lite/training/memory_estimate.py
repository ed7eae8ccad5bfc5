"""What a layout needs per GPU before anything is allocated (issue 17): weights, gradients,
optimizer state, activations and FSDP2's gathered layers on the most loaded rank, and what
`--optimizer-cpu-offload` moves to the host. A layout whose estimate exceeds the visible GPU
memory is refused in one line that names flags which would fit, instead of running out of
memory minutes later in the first step.

Byte counts follow our implementation (spec §7.1, §8.3): per parameter a model copy in its
dtype, a main grad (fp32 unless --grad-reduce-in-bf16 / fp16 without fp32 accumulation), an
fp32 main copy for bf16/fp16 params, and the Adam moments (8 B) or SGD momentum (4 B); the
distributed optimizer divides mains and moments by DP×CP, FSDP2 divides everything and keeps
fp32 shards as the mains. Activations follow Megatron's formula (spec §3.5, Korthikanti et
al. 2022) with flash attention (no [s, s] scores) and SwiGLU's wider MLP; it is a planning
figure, not an allocator trace, so only an estimate past the whole device is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from megatron_lite.config.configs import ModelConfig
from megatron_lite.training.theoretical_memory import parameter_counts

_GIB = 2.0**30
_MB = 2.0**20


@dataclass(frozen=True)
class MemoryLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int | None = None
    micro_batch_size: int = 1
    seq_length: int = 1
    num_microbatches: int = 1
    grad_fp32: bool = True  # main grads in fp32 (--accumulate-allreduce-grads-in-fp32 / --bf16)
    optimizer: str = "adam"
    distributed_optimizer: bool = False
    fsdp2: bool = False
    fsdp2_reshard_after_forward: bool = True  # False: --torch-fsdp2-no-reshard-after-forward
    offload_fraction: float = 0.0  # 0 without --optimizer-cpu-offload


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU, and in host memory for offloaded optimizer state."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    gathered: float  # FSDP2: unsharded layers in flight
    host: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.gathered


def _rank_params(cfg: ModelConfig, lay: MemoryLayout) -> tuple[float, float, float]:
    """(params of the most loaded rank, of one layer, of the embedding/output/final-norm root),
    each as held by one TP rank."""
    counts = parameter_counts(cfg)
    table = cfg.hidden_size * cfg.vocab_size
    tables = 2 if (cfg.untie_embeddings_and_output_weights and lay.pp == 1) else 1
    layer = (counts["block"] - 2 * cfg.hidden_size) / cfg.num_layers
    return (counts["block"] / lay.pp + tables * table) / lay.tp, layer / lay.tp, tables * table / lay.tp


def _activations(cfg: ModelConfig, lay: MemoryLayout) -> float:
    """Bytes of activations held for backward on the first pipeline stage (spec §3.5)."""
    s, b, h = lay.seq_length / lay.cp, lay.micro_batch_size, cfg.hidden_size
    elem = 2 if cfg.params_dtype in (torch.bfloat16, torch.float16) else 4
    sbh = s * b * h * elem / 2  # the formula's unit is 2-byte activations
    split = lay.tp if (cfg.sequence_parallel or lay.tp == 1) else 1  # norms/dropout under SP
    mlp = (6 if cfg.swiglu else 4) * cfg.ffn_hidden_size / h
    per_layer = sbh * (10 / split + (8 + mlp) / lay.tp)
    if cfg.tp_comm_overlap and cfg.sequence_parallel:
        # The QKV and FC1 inputs (2 sbh each of the 10) are held gathered (layers.py).
        per_layer += 4 * sbh * (1 - 1 / split)
    layers = cfg.num_layers  # L/pp layers per stage x pp micro-batches in flight (1F1B)
    if cfg.recompute_granularity == "full":
        n = cfg.recompute_num_layers or 1
        kept = 2 if cfg.recompute_keeps_attention else 1  # the input, and the attention output
        act = (layers / n) * 2 * kept * sbh / split + n * per_layer  # checkpoints + one group's
    else:
        act = layers * per_layer
    if lay.vpp:
        act *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    elif lay.pp > 1:
        act *= min(1.0, lay.num_microbatches / lay.pp)
    if lay.pp == 1:  # embedding output and fp32 logits of the loss
        act += 4 * sbh + 4 * s * b * cfg.vocab_size / lay.tp
        if cfg.tp_comm_overlap and cfg.sequence_parallel:  # the output layer's input, gathered
            act += 2 * sbh * (1 - 1 / split)
    return act


def estimate(cfg: ModelConfig, lay: MemoryLayout) -> MemoryEstimate:
    params, layer, root = _rank_params(cfg, lay)
    dtype = cfg.params_dtype.itemsize
    grad = 4 if lay.grad_fp32 else dtype
    main = 4 if dtype < 4 else 0  # an fp32 copy of bf16/fp16 params
    moments = 8 if lay.optimizer == "adam" else 4
    act = _activations(cfg, lay)
    shards = lay.dp * lay.cp
    if lay.fsdp2:
        # fp32 shards are weights and mains at once. Gathered in the compute dtype: the root
        # and two layers (the current one and the prefetched one), or every layer of the
        # stage at the end of the forward without resharding after it; the gradients of the
        # root and two layers, and their fp32 copies for the reduce-scatter.
        layers = 2 if lay.fsdp2_reshard_after_forward else cfg.num_layers / lay.pp
        in_flight = (root + layers * layer) * dtype + (root + 2 * layer) * (dtype + 4)
        return MemoryEstimate(4 * params / shards, 4 * params / shards, moments * params / shards, act,
                              in_flight, 0.0)
    state = (main + moments) * params / (shards if lay.distributed_optimizer else 1)
    f = lay.offload_fraction
    return MemoryEstimate(dtype * params, grad * params, (1 - f) * state, act, 0.0, f * state)


def _parts(est: MemoryEstimate, unit: float) -> str:
    parts = [f"weights {est.weights / unit:.2f}", f"gradients {est.grads / unit:.2f}",
             f"optimizer state {est.optimizer / unit:.2f}", f"activations {est.activations / unit:.2f}"]
    if est.gathered:
        parts.append(f"gathered layers {est.gathered / unit:.2f}")
    return ", ".join(parts)


def describe(est: MemoryEstimate, visible: float | None) -> str:
    """The per-GPU memory line printed before training, in MB (2^20 bytes) as the theoretical
    memory line of spec §3.5."""
    line = f"memory estimate per GPU (MB, most loaded rank): {_parts(est, _MB)}; total {est.total / _MB:.2f}"
    if visible:
        line += f" of {visible / _MB:.2f} visible"
    if est.host:
        line += f"; optimizer state offloaded to host memory: {est.host / _MB:.2f}"
    return line


def _offload_fraction_that_fits(cfg, lay, budget: float, host: float | None) -> float | None:
    """The smallest offload fraction (in steps of 0.05) whose device part fits `budget` and
    whose host part fits `host` bytes, or None."""
    base = estimate(cfg, replace(lay, offload_fraction=0.0))
    if lay.fsdp2 or base.optimizer <= 0:
        return None
    need = (base.total - budget) / base.optimizer
    f = min(1.0, max(0.05, -(-need * 20 // 1) / 20))  # rounded up to 0.05
    est = estimate(cfg, replace(lay, offload_fraction=f))
    if est.total > budget or (host is not None and est.host > host * HEADROOM):
        return None
    return f


# Suggestions must fit with room to spare: the allocator's fragmentation, the optimizer's
# temporaries and NCCL buffers are not in the estimate.
HEADROOM = 0.9


def suggestions(cfg: ModelConfig, lay: MemoryLayout, visible: float, host: float | None = None) -> list[str]:
    """Flag sets that would fit `visible` bytes per GPU (with HEADROOM), cheapest first."""
    budget = HEADROOM * visible
    out, fits = [], lambda **kw: estimate(cfg, replace(lay, **kw)).total <= budget
    sharded = lay.dp * lay.cp > 1
    if sharded and not (lay.distributed_optimizer or lay.fsdp2) and fits(distributed_optimizer=True):
        out.append("--use-distributed-optimizer")
    if sharded and lay.pp == 1 and not lay.fsdp2 and fits(fsdp2=True, distributed_optimizer=False,
                                                            offload_fraction=0.0):
        out.append("--use-torch-fsdp2 --no-gradient-accumulation-fusion")
    if cfg.recompute_granularity != "full":
        full = replace(cfg, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if estimate(full, lay).total <= budget:
            out.append("--recompute-granularity full --recompute-method uniform --recompute-num-layers 1")
    f = _offload_fraction_that_fits(cfg, lay, budget, host)
    if f is not None and f > lay.offload_fraction:
        out.append(f"--optimizer-cpu-offload --optimizer-offload-fraction {f:g}")
    if lay.micro_batch_size > 1 and fits(micro_batch_size=1):
        out.append("--micro-batch-size 1")
    return out


def check_fits(cfg: ModelConfig, lay: MemoryLayout, visible: float | None,
               host: float | None = None) -> str | None:
    """None when the estimate fits `visible` bytes per GPU (None: not a GPU run, nothing to
    check) and its offloaded state fits `host` bytes of host memory per GPU; else the
    one-line refusal."""
    est = estimate(cfg, lay)
    if host is not None and est.host > host:
        return (f"--optimizer-offload-fraction {lay.offload_fraction:g} puts {est.host / _GIB:.1f} GiB of "
                f"optimizer state in host memory per GPU, more than the {host / _GIB:.1f} GiB this host has "
                "per local GPU; lower the fraction or use more GPUs")
    if visible is None or est.total <= visible:
        return None
    tips = suggestions(cfg, lay, visible, host)
    hint = ("; these would fit: " + " | ".join(tips)) if tips else \
        "; add GPUs (tensor, pipeline or data parallelism with a sharded optimizer)"
    return (f"this layout needs about {est.total / _GIB:.1f} GiB per GPU ({_parts(est, _GIB)} GiB), "
            f"more than the {visible / _GIB:.1f} GiB visible{hint}")


def host_memory(local_gpus: int) -> float | None:
    """Bytes of host memory per local GPU: physical memory, or the cgroup limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total / max(local_gpus, 1)

"""Does capturing each transformer layer in a CUDA graph lift a host-bound step? A probe for
issue 13, not a training path: the step is timed eagerly, then with every decoder layer
replaced by `torch.cuda.make_graphed_callables` (forward and backward graphs, one memory pool),
on the same model and batches.

    python tools/bench/cuda_graph_probe.py --micro-batch-size 4
    torchrun --nproc_per_node 2 tools/bench/cuda_graph_probe.py --tensor-model-parallel-size 2

GPT 1.3B (tools/benchmark.py's preset), bf16, 4 micro-batches of gradient accumulation. The
gradient-accumulation fusion is off in both runs: its `grad_added_to_main_grad` flag is a
Python side effect that a replayed graph would not repeat. Prints ms/step eager and graphed,
and the losses of both (same data, so equal up to the optimizer having moved on).

Measured on an H200 (torch 2.11): TP1 mbs 1 eager 178.8 ms, graphed 175.7 (1.02x); mbs 4
555.7 and 559.7 (0.99x). One GPU's step is therefore not host-bound even at micro-batch 1.
TP2 + SP on 2xH200, mbs 4: eager 422.0 ms, layers graphed 365.7 (1.15x), the losses as
expected (11.09 per token, then 10.97). That needs `--capture-error-mode thread_local` (the
default here): with torch's "global" mode an earlier run's capture never finished. Both
ranks then hung in destroy_process_group with the graphs alive, so the probe exits without it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.init import init_model_parameters
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer, OptimizerConfig
from megatron_lite.training.train_step import train_step
from tools.benchmark import PRESETS, _batches, _parallel_state


def _build(a, device):
    from megatron_lite.config.configs import ModelConfig

    tp = a.tensor_model_parallel_size
    cfg = ModelConfig(**dict(PRESETS["gpt-1.3b"], max_position_embeddings=a.seq_length),
                      params_dtype=torch.bfloat16, sequence_parallel=tp > 1,
                      gradient_accumulation_fusion=False)
    ps = _parallel_state(1, tp, None)
    model = GPTModel(cfg, ps, rng_tracker=build_rng_tracker(1234, ps.tp_rank, 0, device), device=device)
    init_model_parameters(model, 1234, cfg.init_method_std, cfg.num_layers, ps.tp_rank, ps.tp_size)
    ddp = DistributedDataParallel(model, ps, DDPConfig())
    opt = MixedPrecisionOptimizer(model.named_parameters(), OptimizerConfig(lr=1e-4), ps)
    return cfg, ps, model, ddp, opt


def _capture_mode(mode: str) -> None:
    """Make make_graphed_callables capture with `mode`: it calls torch.cuda.graph with the
    default "global", under which a CUDA call that is unsafe during capture fails in ANY thread
    of the process, e.g. the NCCL watchdog's event queries; "thread_local" only checks the
    capturing thread (what Megatron's and TE's graph capture use)."""
    base = torch.cuda.graphs.graph

    class graph(base):  # noqa: N801 - stands in for torch.cuda.graph
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode=mode, **kw):
            super().__init__(cuda_graph, pool=pool, stream=stream,
                             capture_error_mode=capture_error_mode, **kw)

    torch.cuda.graph = graph


def _graph_layers(model, cfg, ps, a, device) -> None:
    """Swap every decoder layer's forward for graphed forward/backward replays."""
    layers = tuple(model.decoder.layers)
    s = a.seq_length // ps.tp_size if cfg.sequence_parallel else a.seq_length
    samples = tuple((torch.randn(s, a.micro_batch_size, cfg.hidden_size, dtype=torch.bfloat16,
                                 device=device, requires_grad=True),) for _ in layers)  # [s/tp, b, h]
    torch.cuda.make_graphed_callables(layers, samples, num_warmup_iters=3)  # replaces forward

    def run(layers, x, rope):  # the graphs take the hidden states alone (GPT: no RoPE tensor)
        assert rope is None
        for layer in layers:
            x = layer(x)
        return x

    model.decoder._run = run  # shadows TransformerBlock._run for this block only


def _time(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-micro-batches", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--capture-error-mode", default="thread_local",
                   choices=["global", "thread_local", "relaxed"])
    a = p.parse_args()
    _capture_mode(a.capture_error_mode)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if a.tensor_model_parallel_size > 1:
        dist.init_process_group("nccl", device_id=device)
    cfg, ps, model, ddp, opt = _build(a, device)
    data = _batches(cfg, a.micro_batch_size, a.seq_length, device)
    losses = []

    def step():
        losses.append(train_step(ddp, opt, data, a.num_micro_batches, ps, device).loss_sum_count)

    eager = _time(step, a.steps, a.warmup)
    eager_loss = losses[-1]
    if ps.rank == 0:
        print(f"eager {eager:.1f} ms/step; capturing ({a.capture_error_mode})", flush=True)
    _graph_layers(model, cfg, ps, a, device)
    if ps.rank == 0:
        print("captured", flush=True)
    graphed = _time(step, a.steps, a.warmup)
    if ps.rank == 0:
        print(f"tp {ps.tp_size} mbs {a.micro_batch_size} x {a.num_micro_batches}: eager {eager:.1f} "
              f"ms/step, layers graphed {graphed:.1f} ms/step ({eager / graphed:.2f}x); last losses "
              f"{eager_loss.tolist()} then {losses[-1].tolist()}", flush=True)
    if dist.is_initialized():
        # destroy_process_group hung on both ranks with the captured NCCL kernels' graphs
        # alive (2xH200, torch 2.11); a probe has nothing to flush, so leave at once.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()

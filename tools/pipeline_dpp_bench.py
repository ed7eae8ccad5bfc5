"""Static vs dynamic (`--use-dpp`) pipeline schedule on GPUs: ms per training iteration,
tokens/s and the traced bubble of each, with even stages, uneven stages or a straggler
injected on the GPU (issue 18).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. \\
    torchrun --nproc_per_node 2 tools/pipeline_dpp_bench.py --preset gpt-1.3b --vpp 2 --micro-batches 16 \\
        [--first-stage-layers 14 --last-stage-layers 10] [--slow-stage 0 --slow-factor 0.3] \\
        [--stall-prob 0.05 --stall-factor 3] [--cuda-graphs] [--trace-dir DIR] [--json FILE]

Builds the model once (PP = the number of GPUs, bf16, fp32 main grads, Adam) and runs the
static interleaved 1F1B schedule, then `--use-dpp` breadth-first and depth-first (and, with
`--modes ...,static-m`, the static schedule with one group of all M micro-batches, as much
activation memory as breadth-first; a dynamic mode ending in `@D`, e.g. `breadth-first@1`,
runs with `--dpp-gpu-queue-depth D`), each for --warmup + --steps iterations (forward,
backward, gradient finalization, optimizer step) timed between CUDA synchronizations
(`--cuda-graphs`: the transformer layers replayed as CUDA graphs, so that a compute's host
launch, which the dynamic order waits for at every hop, is one graph per layer).
Stragglers are GPU time (`torch.cuda._sleep` before a compute), so the stage itself is slower,
not only its host: --slow-factor lengthens every compute of --slow-stage by that fraction of
its measured time; --stall-prob lengthens a random compute of any stage by --stall-factor
times its time (the same computes in every mode). Caveat, measured on 2xH200 (GPT 1.3B, PP2
VPP2, M 16, micro-batches of 1): there the computes are close to host-launch bound, and a GPU
sleep queued before a compute lets the host queue the compute's kernels meanwhile, so
--slow-stage 0 --slow-factor 0.3 made the static schedule faster (532 vs 597 ms/it). For a
stage that is really slower, give it more layers: --first-stage-layers 14 (7 + 7 layers on
rank 0 against 5 + 5 and the output layer on rank 1).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lite.config.configs import ModelConfig
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.models.cuda_graphs import enable_cuda_graphs, release_cuda_graphs
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer, OptimizerConfig
from megatron_lite.pipeline_parallel.chunks import build_model_chunks
from megatron_lite.pipeline_parallel.executor import PipelineConfig, PipelineExecutor
from megatron_lite.pipeline_parallel.layout import build_layout
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from megatron_lite.pipeline_parallel.schedules import in_flight_per_chunk
from megatron_lite.pipeline_parallel.trace import (
    PipelineTrace,
    bubble_stats,
    gather_events,
    mean_durations,
    static_order_mismatches,
    write_chrome_trace,
)
from megatron_lite.training.train_step import train_step
from tools.benchmark import PRESETS

# static: Megatron's default order (groups of N = PP); static-m: the static schedule with one
# group of all M micro-batches, which holds as many activations as --use-dpp breadth-first.
MODES = ("static", "breadth-first", "depth-first", "static-m")


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt-1.3b")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--vpp", type=int, default=2, help="model chunks per pipeline rank")
    p.add_argument("--micro-batches", type=int, default=16, help="M per iteration")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--first-stage-layers", type=int, default=None, help="--decoder-first-pipeline-num-layers")
    p.add_argument("--last-stage-layers", type=int, default=None, help="--decoder-last-pipeline-num-layers")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES[:3]),
                   help=f"comma-separated, from {','.join(MODES)}; a dynamic one may end in @D, its "
                   "--dpp-gpu-queue-depth (e.g. breadth-first@1)")
    p.add_argument("--slow-stage", type=int, default=None, help="pipeline rank made slower")
    p.add_argument("--slow-factor", type=float, default=0.3, help="extra time of --slow-stage's computes")
    p.add_argument("--stall-prob", type=float, default=0.0, help="chance of a stall per compute")
    p.add_argument("--stall-factor", type=float, default=3.0, help="stall length in compute times")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="every mode with per-layer CUDA graphs (--cuda-graph-impl local), captured "
                        "in its first iteration")
    p.add_argument("--trace-dir", default=None, help="write each mode's Chrome trace here")
    p.add_argument("--json", default=None, help="append one JSON line per mode to this file")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="process-group timeout; a --use-dpp rank waiting this long for an input "
                        "stops with a line saying what it could run and what has arrived")
    return p.parse_args()


def _batches(vocab: int, mbs: int, seq: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        yield {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(mbs, seq),
               "position_ids": torch.arange(seq).expand(mbs, seq).contiguous()}


def _cycles_per_ms(device) -> float | None:
    """GPU clock cycles per millisecond of torch.cuda._sleep (None on CPU: the delays sleep)."""
    if device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    torch.cuda.synchronize(device)
    return 20_000_000 / start.elapsed_time(end)


class _Straggler:
    """GPU time added before this rank's computes: `extra[(op)]` ms always (slow stage), and
    a stall of `stall_ms[op]` where a hash of (step, micro-batch, chunk, op, rank) says so."""

    def __init__(self, a, rank: int, compute_ms: dict, cycles_per_ms: float | None):
        slow = a.slow_stage == rank
        self.extra = {op: (a.slow_factor * compute_ms[op] if slow else 0.0) for op in "FB"}
        self.stall = {op: a.stall_factor * compute_ms[op] for op in "FB"}
        self.prob, self.rank, self.cycles_per_ms, self.step = a.stall_prob, rank, cycles_per_ms, 0

    def wrap(self, executor) -> None:
        for op, name in (("F", "_forward"), ("B", "_backward")):
            compute = getattr(executor, name)

            def slowed(mb, chunk, *rest, _op=op, _compute=compute):
                ms = self.extra[_op]
                # Seeded by a string (sha512), so the same computes stall in every mode.
                draw = random.Random(f"{self.step}/{mb}/{chunk}/{_op}/{self.rank}").random()
                if draw < self.prob:
                    ms += self.stall[_op]
                if ms and self.cycles_per_ms is None:
                    time.sleep(ms / 1e3)  # a CPU smoke run
                elif ms:
                    torch.cuda._sleep(int(ms * self.cycles_per_ms))
                return _compute(mb, chunk, *rest)
            setattr(executor, name, slowed)


def _group_size(mode: str, a) -> int | None:
    return a.micro_batches if mode == "static-m" else None


@dataclass
class _Setup:
    ddp: list
    opt: object
    ps: ParallelState
    channels: PipelineChannels
    device: torch.device
    data: object


def _run_mode(mode: str, a, b: _Setup, straggler, warmup: int, steps: int):
    """(seconds per iteration, trace, peak GiB) of `steps` timed iterations after `warmup`."""
    trace = PipelineTrace(b.ps.rank, b.ps.pp_rank, b.device, max_steps=warmup + steps)
    static = mode.startswith("static")
    order, _, depth = mode.partition("@")  # "breadth-first@1": --dpp-gpu-queue-depth 1
    pcfg = PipelineConfig(microbatch_group_size=_group_size(mode, a), overlap_p2p_comm=True,
                          dynamic=not static, dynamic_order="breadth-first" if static else order,
                          dynamic_queue_depth=int(depth or 0))
    executor = PipelineExecutor(b.ddp, b.ps, pcfg, b.channels, trace)
    if straggler is not None:
        straggler.wrap(executor)
    if a.cuda_graphs:  # captured afresh for this mode's schedule, in its first iteration
        slots = in_flight_per_chunk(executor.schedule(a.micro_batches), a.vpp)
        for chunk, n in zip(b.ddp, slots):
            release_cuda_graphs(chunk)
            enable_cuda_graphs(chunk, n)
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(b.device)
    for i in range(warmup + steps):
        if straggler is not None:
            straggler.step = i
        if i == warmup:
            if b.device.type == "cuda":
                torch.cuda.synchronize(b.device)
            dist.barrier(group=b.ps.pp_group)
            start = time.perf_counter()
        train_step(executor, b.opt, b.data, a.micro_batches, b.ps, b.device)
    cuda = b.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(b.device)
    peak = torch.cuda.max_memory_allocated(b.device) / 2**30 if cuda else 0.0
    return (time.perf_counter() - start) / steps, trace, peak


def _report(mode, a, sec, trace, mem_gib, ps) -> dict | None:
    events = gather_events(trace, ps.pp_group)
    if ps.rank != 0:
        return None
    if a.trace_dir:
        os.makedirs(a.trace_dir, exist_ok=True)
        write_chrome_trace(events, os.path.join(a.trace_dir, f"{mode}.json"))
    stats = bubble_stats(events, skip_steps=a.warmup)
    differ, runs = static_order_mismatches(events, _group_size(mode, a), skip_steps=a.warmup)
    tokens = a.micro_batches * a.micro_batch_size * a.seq_length
    return {"mode": mode, "preset": a.preset, "pp": ps.pp_size, "vpp": a.vpp,
            "micro_batches": a.micro_batches,
            "first_last_stage_layers": [a.first_stage_layers, a.last_stage_layers],
            "slow_stage": a.slow_stage, "slow_factor": a.slow_factor if a.slow_stage is not None else None,
            "stall_prob": a.stall_prob, "cuda_graphs": a.cuda_graphs, "ms_per_iteration": round(sec * 1e3, 2),
            "tokens_per_s": round(tokens / sec), "bubble": round(stats.bubble_fraction, 4),
            "step_span_ms": round(stats.mean_span_ms, 2), "compute_ms_per_rank": round(stats.mean_busy_ms, 2),
            "steps_out_of_static_order": f"{differ}/{runs}", "peak_mem_gib_rank0": round(mem_gib, 2),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__}


def main() -> None:
    a = _args()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=a.timeout_s))
    else:  # a smoke run of the tool itself (tests), gloo on CPU
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=a.timeout_s))
    ps = ParallelState.create(pp=dist.get_world_size(), timeout=timedelta(seconds=a.timeout_s))
    channels = PipelineChannels.create(ps, ring=a.vpp > 1, dynamic=True)
    shape = dict(PRESETS[a.preset], max_position_embeddings=max(a.seq_length, 2048))
    if a.num_layers:
        shape["num_layers"] = a.num_layers
    cfg = ModelConfig(**shape, params_dtype=torch.bfloat16)
    layout = build_layout(cfg.num_layers, ps.pp_size, a.vpp, first_stage_layers=a.first_stage_layers,
                          last_stage_layers=a.last_stage_layers)
    tracker = build_rng_tracker(1234, 0, ps.pp_rank, device, graph_safe=a.cuda_graphs)
    chunks = build_model_chunks(cfg, ps, layout, 1234, tracker, device)
    ddp = [DistributedDataParallel(c, ps, DDPConfig()) for c in chunks]
    opt = MixedPrecisionOptimizer([(n, p) for c in ddp for n, p in c.module.named_parameters()],
                                  OptimizerConfig(lr=1e-5), ps)
    b = _Setup(ddp, opt, ps, channels, device, _batches(cfg.vocab_size, a.micro_batch_size, a.seq_length))
    straggler = None
    if a.slow_stage is not None or a.stall_prob:
        # Calibrate on the static schedule: this stage's compute times and the GPU clock.
        _, trace, _ = _run_mode("static", a, b, None, warmup=2, steps=2)
        own = mean_durations(trace.events, skip_steps=2)
        compute_ms = {op: own[(ps.pp_rank, op)] for op in "FB"}
        straggler = _Straggler(a, ps.pp_rank, compute_ms, _cycles_per_ms(device))
    results = []
    for mode in a.modes.split(","):
        sec, trace, mem = _run_mode(mode, a, b, straggler, a.warmup, a.steps)
        results.append(_report(mode, a, sec, trace, mem, ps))
    for chunk in b.ddp:
        release_cuda_graphs(chunk)  # before destroying the groups: live graphs hold NCCL comms
    channels.destroy()
    dist.destroy_process_group()
    if ps.rank != 0:
        return
    base = results[0]["ms_per_iteration"]
    for r in results:
        r["speedup_vs_first_mode"] = round(base / r["ms_per_iteration"], 3)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

"""Training-throughput benchmark on one GPU: tokens/s, TFLOP/s/GPU (spec §3.9), MFU against
a measured bf16 matmul peak, and peak memory.

    python tools/benchmark.py --preset llama-1b --steps 20 --warmup 5
    python tools/benchmark.py --preset llama-1b --hf-baseline   # transformers + SDPA + autocast
    # context parallelism over the GPUs of one node (long sequences, full recompute):
    torchrun --nproc_per_node 2 tools/benchmark.py --preset llama-1b --micro-batch-size 1 \
        --seq-length 131072 --recompute-granularity full --context-parallel-size 2 --cp-comm-type p2p
    # tensor parallelism with sequence parallelism, 4 micro-batches of gradient accumulation,
    # without the gradient-accumulation fusion (compare with the same line without the flag):
    torchrun --nproc_per_node 2 tools/benchmark.py --preset gpt-1.3b --tensor-model-parallel-size 2 \
        --sequence-parallel --num-micro-batches 4 --no-gradient-accumulation-fusion
    # ... and with the SP collectives as ring collective matmuls:
    torchrun --nproc_per_node 2 tools/benchmark.py --preset gpt-1.3b --tensor-model-parallel-size 2 \
        --sequence-parallel --num-micro-batches 4 --tp-comm-overlap

The megatron_lite path is the training path of `pretrain()` (model, main-grad buffer,
mixed-precision optimizer, train_step) on mock tokens; the baseline trains the same shape
with `transformers`' LlamaForCausalLM under bf16 autocast and torch AdamW.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from megatron_lite.config.configs import ModelConfig
from megatron_lite.context_parallel.split import split_batch
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.models.cuda_graphs import enable_cuda_graphs, release_cuda_graphs
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.init import init_model_parameters
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer, OptimizerConfig
from megatron_lite.training.flops import num_floating_point_operations
from megatron_lite.training.nonfinite import NonFiniteCheck
from megatron_lite.training.train_step import train_step

PRESETS = {
    # Llama-3.2-1B shape (issue 3): 16 layers, h 2048, ffn 8192, 32 heads, 8 KV groups.
    "llama-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                     num_query_groups=8, vocab_size=128256, max_position_embeddings=2048,
                     position_embedding_type="rope", rotary_base=500000.0, use_rope_scaling=True,
                     rope_scaling_factor=32.0, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                     untie_embeddings_and_output_weights=False, attention_dropout=0.0, hidden_dropout=0.0),
    # GPT-3 1.3B (Brown et al. 2020, table 2.1): 24 layers, h 2048, 16 heads, GPT-2 vocabulary.
    "gpt-1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=50304,
                     max_position_embeddings=2048, attention_dropout=0.0, hidden_dropout=0.0),
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 vocab_size=512, max_position_embeddings=128, position_embedding_type="rope",
                 normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                 attention_dropout=0.0, hidden_dropout=0.0),
}


def matmul_peak_tflops(device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _batches(cfg, mbs, seq, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    while True:
        ids = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=g)
        yield {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(mbs, seq),
               "position_ids": torch.arange(seq).expand(mbs, seq).contiguous()}


def _parallel_state(cp: int, tp: int, hierarchical):
    """Every GPU of the launch in one CP or TP group (torchrun), or a single process."""
    if cp > 1 or tp > 1:
        return ParallelState.create(tp=tp, cp=cp, hierarchical_cp=hierarchical)
    return ParallelState.create()


def run_megatron_lite(cfg: ModelConfig, mbs, seq, steps, warmup, device, profile=False, cp=1,
                      hierarchical=None, tp=1, num_micro_batches=1, check_for_nan=False,
                      sync_nan_check=False, cuda_graphs=False):
    ps = _parallel_state(cp, tp, hierarchical)
    tracker = build_rng_tracker(1234, ps.tp_rank, 0, device, graph_safe=cuda_graphs)
    model = GPTModel(cfg, ps, rng_tracker=tracker, device=device)
    init_model_parameters(model, 1234, cfg.init_method_std, cfg.num_layers, ps.tp_rank, ps.tp_size)
    model = DistributedDataParallel(model, ps, DDPConfig(check_for_nan_in_grad=check_for_nan))
    opt = MixedPrecisionOptimizer(model.module.named_parameters(), OptimizerConfig(lr=1e-4), ps)
    # Every rank draws the same batch and keeps its zig-zag share (what the CP data path does).
    data = (split_batch(b, ps.cp_size, ps.cp_rank) for b in _batches(cfg, mbs, seq, device))
    losses = []
    nan_check = NonFiniteCheck()  # as pretrain(): recorded on the device, read after the timing

    def step():
        r = train_step(model, opt, data, num_micro_batches, ps, device,
                       nan_check=None if sync_nan_check else nan_check)
        losses.append(r.loss_sum_count)

    if cuda_graphs:  # captured in the first warm-up step (as pretrain does after its warm-up)
        enable_cuda_graphs(model)
    sec = _time(step, steps, warmup, profile)
    release_cuda_graphs(model)  # before destroy_process_group, which hangs while they live
    nan_check.raise_if_found()
    return sec, losses


def run_hf_baseline(cfg: ModelConfig, mbs, seq, steps, warmup, device, profile=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_query_groups, max_position_embeddings=seq,
                         rope_theta=cfg.rotary_base, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = _batches(cfg, mbs, seq, device)
    losses = []

    def step():
        b = next(data)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=b["tokens"].to(device), labels=b["tokens"].to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())

    return _time(step, steps, warmup, profile), losses


def _time(step, steps, warmup, profile=False) -> float:
    """Seconds per step over `steps` after `warmup`; `profile` (True, or a Chrome-trace path
    to write) profiles 3 more steps first."""
    for _ in range(warmup):
        step()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        # A trace also records the host (CPU ops, CUDA runtime calls): trace_streams.py tells
        # a GPU waiting for the host from a host waiting for the GPU.
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if isinstance(profile, str) else [])
        with prof(activities=activities) as p:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=40), flush=True)
        if ProfilerActivity.CPU in activities:  # where the host's own time goes (issue 13)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), flush=True)
        if isinstance(profile, str):  # per-stream busy and overlap: tools/bench/trace_streams.py
            p.export_chrome_trace(profile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--recompute-granularity", default=None)
    p.add_argument("--no-recompute-keeps-attention", action="store_true",
                   help="full recompute re-runs the attention forward (for comparison)")
    p.add_argument("--context-parallel-size", type=int, default=1, help="launch with torchrun, one GPU each")
    p.add_argument("--cp-comm-type", default="p2p")
    p.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs=2, default=None)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="launch with torchrun, one GPU each (not together with CP)")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--tp-comm-overlap", action="store_true",
                   help="SP all-gather/reduce-scatter as ring collective matmuls (with --sequence-parallel)")
    p.add_argument("--num-micro-batches", type=int, default=1, help="gradient accumulation steps per step")
    p.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="weight gradients as separate GEMMs added to main_grad by the DDP hook")
    p.add_argument("--check-for-nan-in-loss-and-grad", action="store_true",
                   help="the NaN/Inf check of the loss and the per-bucket grad norms (pretrain's default)")
    p.add_argument("--sync-nan-check", action="store_true",
                   help="with --check-for-nan-in-loss-and-grad: read it inside every step (one host sync) "
                        "instead of after the timing, as pretrain() does at log lines")
    p.add_argument("--cross-entropy-loss-fusion", action="store_true")
    p.add_argument("--cuda-graph-impl", choices=["none", "local"], default="none",
                   help="local: each transformer layer replayed as CUDA graphs (models/cuda_graphs.py)")
    p.add_argument("--no-fusion", action="store_true", help="eager SwiGLU, RoPE and RMSNorm")
    p.add_argument("--hf-baseline", action="store_true", help="time transformers instead")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 steps")
    p.add_argument("--profile-trace", default=None, metavar="DIR",
                   help="--profile, and write each rank's Chrome trace to DIR/rank<r>.json")
    return p.parse_args()


def _config(a) -> ModelConfig:
    full = a.recompute_granularity == "full"  # uniform, one layer per checkpoint
    preset = dict(PRESETS[a.preset], max_position_embeddings=max(a.seq_length, 2048))
    return ModelConfig(**preset, params_dtype=torch.bfloat16,
                       recompute_method="uniform" if full else None, recompute_num_layers=1 if full else None,
                       recompute_keeps_attention=not a.no_recompute_keeps_attention,
                       cp_comm_type=(a.cp_comm_type,),
                       attention_backend=a.attention_backend, recompute_granularity=a.recompute_granularity,
                       cross_entropy_loss_fusion=a.cross_entropy_loss_fusion,
                       sequence_parallel=a.sequence_parallel, tp_comm_overlap=a.tp_comm_overlap,
                       gradient_accumulation_fusion=not a.no_gradient_accumulation_fusion,
                       bias_swiglu_fusion=not a.no_fusion, apply_rope_fusion=not a.no_fusion,
                       no_persist_layer_norm=a.no_fusion)


def _result(a, cfg, sec, losses, device) -> dict:
    gpus = a.context_parallel_size * a.tensor_model_parallel_size
    samples = a.micro_batch_size * a.num_micro_batches
    tokens = samples * a.seq_length / gpus  # per GPU: the CP/TP group shares its sequences
    flops = num_floating_point_operations(cfg, samples, a.seq_length) / gpus
    peak = matmul_peak_tflops(device)
    return {
        "impl": "hf-transformers" if a.hf_baseline else "megatron_lite", "preset": a.preset,
        "fusion": not a.no_fusion, "ce_fusion": a.cross_entropy_loss_fusion,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "micro_batch": a.micro_batch_size, "seq": a.seq_length, "step_ms": round(sec * 1000, 2),
        "context_parallel": a.context_parallel_size,
        "cp_comm_type": a.cp_comm_type if a.context_parallel_size > 1 else None,
        "tensor_parallel": a.tensor_model_parallel_size, "sequence_parallel": a.sequence_parallel,
        "tp_comm_overlap": a.tp_comm_overlap, "cuda_graphs": a.cuda_graph_impl,
        "micro_batches": a.num_micro_batches,
        "grad_accumulation_fusion": not a.no_gradient_accumulation_fusion,
        "nan_check": (("sync" if a.sync_nan_check else "deferred") if a.check_for_nan_in_loss_and_grad
                      else None),
        "recompute": a.recompute_granularity, "recompute_keeps_attention": not a.no_recompute_keeps_attention,
        "tokens_per_s": round(tokens * gpus / sec), "tokens_per_s_per_gpu": round(tokens / sec),
        "tflops_per_gpu": round(flops / sec / 1e12, 1),
        "mfu_vs_measured_matmul_peak": round(flops / sec / 1e12 / peak, 3),
        "matmul_peak_tflops": round(peak, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_last_loss": [float(_loss(losses[0])), float(_loss(losses[-1]))],
    }


def main() -> None:
    a = _args()
    if not torch.cuda.is_available():
        raise SystemExit("error: tools/benchmark.py needs a CUDA GPU")
    device = torch.device("cuda")
    cp, tp = a.context_parallel_size, a.tensor_model_parallel_size
    if cp > 1 and tp > 1:
        raise SystemExit("error: --context-parallel-size and --tensor-model-parallel-size together "
                         "are not benchmarked")
    if cp > 1 or tp > 1:  # under torchrun: one GPU per rank, all in one CP or TP group
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    cfg = _config(a)
    profile = a.profile
    if a.profile_trace:
        os.makedirs(a.profile_trace, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        profile = os.path.join(a.profile_trace, f"rank{rank}.json")
    shape = (cfg, a.micro_batch_size, a.seq_length, a.steps, a.warmup, device, profile)
    if a.hf_baseline:
        sec, losses = run_hf_baseline(*shape)
    else:
        sec, losses = run_megatron_lite(*shape, cp, a.hierarchical_context_parallel_sizes, tp,
                                        a.num_micro_batches, a.check_for_nan_in_loss_and_grad,
                                        a.sync_nan_check, a.cuda_graph_impl == "local")
    result = _result(a, cfg, sec, losses, device)
    first = (cp == 1 and tp == 1) or dist.get_rank() == 0
    if cp > 1 or tp > 1:
        dist.destroy_process_group()
    if not first:
        return
    print(json.dumps(result), flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")


def _loss(x: torch.Tensor) -> float:
    return (x[0] / x[1]).item() if x.ndim == 1 and x.numel() == 2 else x.item()


if __name__ == "__main__":
    main()

"""Profile ring attention (`--cp-comm-type p2p`) on the GPUs of one node and measure how much
of the K/V transfer time runs under the attention kernels (the overlap of spec §9.2).

    torchrun --nproc_per_node 2 tools/cp_ring_trace.py --seq-length 32768 --trace ring.json

Runs forward + backward of one attention layer three times (Llama-3.2-1B heads: 32 query, 8 K/V, d 64)
under the torch profiler and writes rank 0's Chrome trace. Prints one JSON line: the NCCL
kernels' total time and the part of it during which a compute kernel ran on another stream.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from megatron_lite.context_parallel import ContextParallelAttention
from megatron_lite.distributed.parallel_state import ParallelState


def _intervals(prof):
    """(NCCL send/recv kernel intervals, compute kernel intervals) in µs from the profiler's
    CUDA events."""
    comm, compute = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.time_range.elapsed_us() <= 0:
            continue
        span = (e.time_range.start, e.time_range.end)
        name = e.name.lower()
        if "nccl" not in name:
            compute.append(span)
        elif "send" in name or "recv" in name:  # the ring's transfers (not the barrier)
            comm.append(span)
    return comm, compute


def overlapped_fraction(comm, compute) -> float:
    """Part of the communication time during which some compute kernel was running."""
    merged = []
    for s, e in sorted(compute):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    total = sum(e - s for s, e in comm)
    covered = 0.0
    for s, e in comm:
        for ms, me in merged:
            covered += max(0.0, min(e, me) - max(s, ms))
    return covered / total if total else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--trace", default=None, help="write rank 0's Chrome trace here")
    a = p.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    ps = ParallelState.create(cp=dist.get_world_size())
    attn = ContextParallelAttention("p2p", ps.cp_comm())
    s_local = a.seq_length // ps.cp_size
    g = torch.Generator(device=device).manual_seed(ps.cp_rank)
    mk = lambda n: torch.randn(s_local, 1, n, 64, generator=g, device=device,  # noqa: E731
                               dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(32), mk(8), mk(8)

    def step():
        attn(q, k, v, None).sum().backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        # The profilers of the two ranks start at different times: line them up first, or the
        # first transfer's kernel spends that skew waiting for the peer.
        dist.barrier(group=ps.cp_group, device_ids=[device.index])
        torch.cuda.synchronize()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    comm, compute = _intervals(prof)
    result = {"seq": a.seq_length, "cp": ps.cp_size, "nccl_kernels": len(comm),
              "nccl_ms": round(sum(e - s for s, e in comm) / 1000, 3),
              "nccl_time_under_compute": round(overlapped_fraction(comm, compute), 3)}
    if ps.cp_rank == 0:
        if a.trace:
            prof.export_chrome_trace(a.trace)
        print(json.dumps(result), flush=True)
    ps.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

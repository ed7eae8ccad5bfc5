"""Host time of one tensor-parallel collective call over NCCL: what the CPU spends to enqueue an
all-gather or reduce-scatter, with the GPU kept busy so that the host never waits for it.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 tools/bench/collective_host_cost.py
    TORCH_FR_BUFFER_SIZE=0 torchrun --nproc_per_node 2 tools/bench/collective_host_cost.py

Issue 13: a TP2 step of GPT 1.3B took the same time at micro-batch 2 as at 4 (host-bound), with
about 1,000 collectives per step. Prints per call kind the mean host microseconds over `--calls`
calls (torch.distributed directly, and megatron_lite's `collectives` wrappers with a wait, as
the layers use them), and the flight recorder's entries (`TORCH_FR_BUFFER_SIZE`, torch's
default 2000) so that runs with it on and off can be compared.

Measured on 2xH200 (torch 2.11, two runs, the recorder on in both): torch's own calls 22-37 us,
megatron_lite's wrappers with their wait 40-53 us (before a440ce3 trimmed them). At ~1,000 calls
per step that is 40-50 ms of a host-bound TP2 step of 340-490 ms: a part, not the cause.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from megatron_lite.tensor_parallel.collectives import all_gather, reduce_scatter


def host_us(fn, calls: int) -> float:
    """Mean host microseconds per `fn()` while a long GPU sleep holds every kernel back. Timed
    on the second of two rounds: the first fills the caching allocator with the blocks the
    outputs need (held by pending NCCL work, they cannot be reused within a round)."""
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s at H200 clocks, longer than a round's enqueueing
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--tokens", type=int, default=8192, help="gathered sequence x micro-batch")
    p.add_argument("--hidden", type=int, default=2048)
    a = p.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    n = dist.get_world_size()
    group = dist.new_group(list(range(n)))  # a subgroup, as the TP group is
    part = torch.ones(a.tokens // n, a.hidden, dtype=torch.bfloat16, device=device)  # [s/tp, h]
    full = torch.ones(a.tokens, a.hidden, dtype=torch.bfloat16, device=device)  # [s, h]
    out = torch.empty_like(full)
    kinds = {
        "dist.all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out, part, group=group),
        "dist.reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(part, full, group=group),
        "collectives.all_gather async+wait": lambda: all_gather(part, 0, group, async_op=True).wait(),
        "collectives.reduce_scatter async+wait": lambda: reduce_scatter(full, 0, group, async_op=True).wait(),
        "torch.empty (baseline)": lambda: torch.empty_like(part),
    }
    results = {k: host_us(fn, a.calls) for k, fn in kinds.items()}
    if dist.get_rank() == 0:
        fr = os.environ.get("TORCH_FR_BUFFER_SIZE", os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE", "default"))
        for k, us in results.items():
            print(f"TORCH_FR_BUFFER_SIZE={fr}: {k:40s} {us:8.1f} us host per call", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

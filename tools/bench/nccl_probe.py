"""All-gather and reduce-scatter bandwidth over NCCL at the sizes tensor parallelism moves,
to see which protocol NCCL picks and what it costs (launch it once per NCCL_PROTO setting).

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 tools/bench/nccl_probe.py [--sizes-mib 1 4 16 32 64]

Prints per size the mean time of one collective and its bus bandwidth (NCCL's definition:
bytes of the gathered tensor x (n-1)/n per second), measured between CUDA events over 20 runs.
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import torch
import torch.distributed as dist


def time_ms(fn, iters: int = 20) -> float:
    """Mean ms of `fn()` on the current stream, between CUDA events, after 5 warm-up calls
    (also used by tp_overlap_probe.py)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _bus_gbps(nbytes: int, n: int, ms: float) -> float:
    return nbytes * (n - 1) / n / (ms / 1e3) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 4, 16, 32, 64],
                   help="size of the gathered (full) tensor")
    a = p.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    n, rank = dist.get_world_size(), dist.get_rank()
    for mib in a.sizes_mib:
        numel = int(mib * 2**20) // 2 // n * n  # bf16 elements, divisible by n
        full = torch.empty(numel, dtype=torch.bfloat16, device=device)
        part = torch.ones(numel // n, dtype=torch.bfloat16, device=device)
        ag = time_ms(partial(dist.all_gather_into_tensor, full, part))
        rs = time_ms(partial(dist.reduce_scatter_tensor, part, full))
        if rank == 0:
            bus = partial(_bus_gbps, numel * 2, n)
            print(f"NCCL_PROTO={os.environ.get('NCCL_PROTO', 'default')} {mib:6.1f} MiB: "
                  f"all-gather {ag * 1e3:8.1f} us ({bus(ag):6.1f} GB/s), "
                  f"reduce-scatter {rs * 1e3:8.1f} us ({bus(rs):6.1f} GB/s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

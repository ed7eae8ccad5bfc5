"""What verifying a checkpoint's CRC-32 checksums costs next to reading its tensors.

    python tools/bench/checksum_cost.py CKPT_ROOT [--ranks N] [--threads T]

Times, for the checkpoint the tracker names: (1) `checksums.first_mismatch` over all files, as
one rank does it, and as each of N ranks would (every N-th file), each reading its segments on
T threads (default: what a load uses, min(8, cpu count)); (2) reading every tensor through the
safe DCP reader into host memory (what a load reads anyway). Run it twice: the first pass
measures the disk, the second the page cache. `--threads 1` gives the single-core baseline;
records saved before per-segment CRCs verify one thread per file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from megatron_lite.checkpoint.checksums import default_threads, first_mismatch, recorded  # noqa: E402
from megatron_lite.checkpoint.layout import iteration_dir, read_tracker  # noqa: E402
from megatron_lite.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--ranks", type=int, default=8, help="ranks sharing the verification")
    p.add_argument("--threads", type=int, default=None, help="verification threads per rank")
    a = p.parse_args()
    found = read_tracker(a.root)
    if found is None:
        raise SystemExit(f"error: {a.root}: no latest_checkpointed_iteration.txt")
    directory = iteration_dir(a.root, *found)
    records = recorded(directory)
    size = sum(v["bytes"] for v in records.values())
    if not size:
        raise SystemExit(f"error: {directory}: no checksum records (saved before checksums existed?)")
    start = time.perf_counter()
    assert first_mismatch(directory, threads=a.threads) is None
    whole = time.perf_counter() - start
    worst = 0.0
    for rank in range(a.ranks):
        t0 = time.perf_counter()
        first_mismatch(directory, rank, a.ranks, threads=a.threads)
        worst = max(worst, time.perf_counter() - t0)
    meta = SafeFileSystemReader(directory).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in meta.items() if hasattr(m, "size")}
    start = time.perf_counter()
    dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner(), no_dist=True)
    read = time.perf_counter() - start
    gb = size / 1e9
    segments = sum(len(v.get("segments", [None])) for v in records.values())
    threads = a.threads or default_threads()
    print(f"{directory}: {gb:.2f} GB in {len(records)} files, {segments} verification tasks")
    print(f"checksum, one rank on {threads} threads: {whole:.2f} s ({gb / whole:.2f} GB/s); "
          f"slowest of {a.ranks} ranks' shares: {worst:.2f} s")
    print(f"tensor read (DCP, host memory): {read:.2f} s ({gb / read:.2f} GB/s)")


if __name__ == "__main__":
    main()

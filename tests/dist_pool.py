"""Run test functions inside N-process gloo worlds.

Spawning a process and importing torch costs seconds, so each world size keeps one pool of
worker processes alive for the whole pytest session. A task is a module-level function
(pickled by reference), called on every rank as `fn(rank, world_size, *args)`; each rank's
return value comes back in rank order. A failing rank's traceback is re-raised in the test.
After a failure or a timeout the pool is torn down and rebuilt, since a rank may be left
waiting in a collective.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import traceback
from datetime import timedelta

_TASK_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results, sys_path) -> None:
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value = fn(rank, world_size, *args, **kwargs)
            results.put((rank, True, value, len(os.listdir("/proc/self/task"))))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, False, traceback.format_exc(), 0))
    dist.destroy_process_group()


class DistributedPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.threads = 0  # the most threads a worker had after a task
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, world_size, port, self._tasks[r], self._results, list(sys.path)))
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        for q in self._tasks:
            q.put((fn, args, kwargs))
        out: list = [None] * self.world_size
        failures = []
        for _ in range(self.world_size):
            try:
                rank, ok, value, threads = self._results.get(timeout=_TASK_TIMEOUT_S)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__} did not finish on all {self.world_size} ranks "
                                   f"within {_TASK_TIMEOUT_S}s") from None
            self.threads = max(self.threads, threads)
            if ok:
                out[rank] = value
            else:
                failures.append((rank, value))
                break  # the other ranks may be stuck in a collective; don't wait for them
        if failures:
            rank, tb = failures[0]
            raise RuntimeError(f"{fn.__name__} failed on rank {rank} of {self.world_size}:\n{tb}")
        return out

    def close(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)


# A model's gloo groups outlive the test that made it: the DDP hooks on its parameters close a
# reference cycle through C++ that the garbage collector cannot see, so its process groups
# (and their threads) stay alive. Each gloo group keeps threads that wake up now and then; at
# ~450 per worker, idle pools took a fifth of a CPU each while later tests ran. A pool whose
# workers pass this many threads is replaced after its task.
_MAX_WORKER_THREADS = 120


class PoolRegistry:
    """One live pool per world size; a pool that saw a failure, or whose workers piled up
    threads (_MAX_WORKER_THREADS), is replaced."""

    def __init__(self):
        self._pools: dict[int, DistributedPool] = {}

    def run(self, world_size: int, fn, *args, **kwargs) -> list:
        pool = self._pools.get(world_size)
        if pool is None:
            pool = self._pools[world_size] = DistributedPool(world_size)
        try:
            out = pool.run(fn, *args, **kwargs)
        except BaseException:
            pool.close()
            del self._pools[world_size]
            raise
        if pool.threads > _MAX_WORKER_THREADS:
            pool.close()
            del self._pools[world_size]
        return out

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

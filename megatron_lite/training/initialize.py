"""Start torch.distributed from torchrun's environment, bind the device, build the
ParallelState and seed the generators (spec §2.12)."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import RNGTracker, build_rng_tracker


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(requested: str | None) -> str:
    """nccl where CUDA is present, gloo otherwise, unless `--distributed-backend` says."""
    if requested is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("--distributed-backend nccl needs CUDA, and no GPU is visible; use gloo")
    return requested


def die_with_launcher() -> None:
    """Under torchrun, end this worker when its launcher dies. torchrun's workers run in their
    own sessions, so a hard kill of torchrun (a scheduler's SIGKILL) would leave them training
    and writing checkpoints beside a restarted job. Linux's parent-death signal kills the
    worker instead (SIGKILL: no signal handler may start a save without a launcher)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here (e.g. a sandbox): nothing else we can do
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(backend: str | None = None, timeout_minutes: float = 10,
                     local_rank: int | None = None) -> DistributedEnv:
    """Initialize the default process group. Without torchrun variables this is a world of one
    (so `python pretrain_gpt.py ...` works too). `local_rank` (`--local-rank`, passed by older
    launchers such as torch.distributed.launch) wins over torchrun's LOCAL_RANK."""
    die_with_launcher()
    backend = resolve_backend(backend)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=rank, world_size=world, timeout=timeout)
    return DistributedEnv(rank, world, local_rank, device, backend)


def build_parallel_state(tp: int, pp: int, cp: int, tied_embeddings: bool, order: str,
                         hierarchical_cp: list[int] | None = None,
                         timeout_minutes: float | None = None,
                         nccl_comm_cfgs: dict | None = None) -> ParallelState:
    return ParallelState.create(tp=tp, pp=pp, cp=cp, order=order, tied_embeddings=tied_embeddings,
                                hierarchical_cp=tuple(hierarchical_cp) if hierarchical_cp else None,
                                timeout=timedelta(minutes=timeout_minutes) if timeout_minutes else None,
                                nccl_comm_cfgs=nccl_comm_cfgs)


def seed_rank(seed: int, ps: ParallelState, device: torch.device,
              data_parallel_random_init: bool = False, graph_safe: bool = False) -> RNGTracker:
    return build_rng_tracker(seed, ps.tp_rank, ps.pp_rank, device, ps.dp_rank, data_parallel_random_init,
                             graph_safe)

"""`--use-dpp` over NCCL on 2 GPUs (PP 2 x VPP 2): the CUDA branches of the dynamic executor
(headers on the host over gloo twins of the links, an NCCL send launched only once its data's
event has completed and the channel's previous send is done, the NCCL receive posted only once
its header has arrived, both from a side stream by per-channel threads, readiness by polling
NCCL works) give the static schedule's losses and gradients while a GPU-side straggler
(`torch.cuda._sleep` on stage 0) reorders the computes; also with CUDA_DEVICE_MAX_CONNECTIONS=1
(one hardware queue for all streams, as Megatron launches set it), where the earlier versions,
which posted receives ahead of their data, hung (measured on 2xH200); and with
`--dpp-gpu-queue-depth 1`, each pick waiting for the GPU. GPU kernels may sum in
another order than the CPU's, so the check is to 1e-5, not bitwise.

`test_crossing_large_sends_complete` probes the one case the design does not rule out by
construction (dynamic_executor.py): both ranks launch a send too large for NCCL's buffers to
each other before either has posted the receive; with one hardware queue, each receive then
queues behind the rank's own send. It fails with a message instead of hanging."""
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST, DEPTH_FIRST, DynamicPlan, Message
from megatron_lite.pipeline_parallel.dynamic_channels import Inbox, Outbox
from megatron_lite.pipeline_parallel.executor import PipelineConfig
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from megatron_lite.pipeline_parallel.schedules import ACT
from tests.distributed.test_pipeline_dynamic import static_order, train_once

pytestmark = pytest.mark.gpu

PP, VPP, M, LAYERS = 2, 2, 8, 8
CROSSING_NUMEL = 64 * 2**20  # fp32: 256 MiB per message, far beyond NCCL's p2p buffers


def _gpu_sleep(cycles_per_s: float):
    return lambda seconds: torch.cuda._sleep(int(seconds * cycles_per_s))


def _cycles_per_s() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / (start.elapsed_time(end) / 1e3)


def _check(rank: int) -> None:
    ps = ParallelState.create(pp=PP)
    channels = PipelineChannels.create(ps, ring=True, backend="nccl", dynamic=True)
    try:
        static, grads, _, _ = train_once(ps, channels, LAYERS, VPP, M, PipelineConfig(overlap_p2p_comm=True),
                                         device="cuda")
        sleep, reordered = _gpu_sleep(_cycles_per_s()), False
        for order in (BREADTH_FIRST, DEPTH_FIRST):
            # (seed, --dpp-gpu-queue-depth): the picks wait for the GPU with depth 1
            for seed, depth in ((0, 0), (1, 0), (2, 0), (0, 1)):
                cfg = PipelineConfig(dynamic=True, dynamic_order=order, dynamic_queue_depth=depth)
                totals, d_grads, seq, peak = train_once(
                    ps, channels, LAYERS, VPP, M, cfg, {(0, "F"): 0.004}, seed=seed, device="cuda",
                    sleep=sleep)
                assert peak <= DynamicPlan(PP, VPP, M, ps.pp_rank, None, order).warmup + 1
                assert sorted(seq) == sorted(static_order(PP, VPP, M, ps.pp_rank))
                reordered |= seq != static_order(PP, VPP, M, ps.pp_rank)
                if static is not None:
                    torch.testing.assert_close(totals, static, rtol=1e-5, atol=1e-6)
                for name, g in grads.items():
                    torch.testing.assert_close(d_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
        flag = torch.tensor([int(reordered)], device="cuda")
        dist.all_reduce(flag, group=ps.pp_group)
        assert flag.item() > 0, "the GPU delays never changed the order"
    finally:
        channels.destroy()
        ps.destroy()


def _crossing(rank: int) -> None:
    """Each rank sends a large message to the other; both sends are launched before either
    receive is posted (a gloo barrier between, and the inbox, whose thread posts the receive
    once the header is there, created after it), as when two neighbours finish at once."""
    ps = ParallelState.create(pp=PP)
    channels = PipelineChannels.create(ps, ring=True, backend="nccl", dynamic=True)
    barrier = ps.create_cpu_groups("pp")
    try:
        peer, stream, device = 1 - ps.pp_rank, torch.cuda.Stream(), torch.device("cuda", rank)
        outbox = Outbox(channels, ACT, peer, stream)
        outbox.put(Message(ACT, 0, 0), torch.full((CROSSING_NUMEL,), float(rank + 1), device=device))
        deadline = time.monotonic() + 60
        while outbox.launched == 0:  # until the header left and the NCCL send was launched
            outbox.pump()
            time.sleep(1e-4)
        dist.barrier(group=barrier)
        inbox = Inbox(channels, ACT, peer, 1, (CROSSING_NUMEL,), torch.float32, device, stream)
        while not (inbox.poll() == 1 and outbox.pump()):
            if time.monotonic() > deadline:
                print(f"rank {rank}: crossing 256 MiB sends did not complete in 60 s "
                      f"(CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')})",
                      file=sys.stderr, flush=True)
                os._exit(3)  # a hung NCCL kernel would also hang the clean-up
            time.sleep(1e-4)
        received = inbox.take(Message(ACT, 0, 0))
        assert torch.equal(received, torch.full_like(received, float(peer + 1)))
        inbox.close(True)
        outbox.close(True)
    finally:
        channels.destroy()
        ps.destroy()


def _worker(rank: int, world: int, port: int, max_connections: str | None, check) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if max_connections is not None:
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = max_connections  # before CUDA starts here
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        check(rank)
    finally:
        dist.destroy_process_group()


def _spawn(max_connections: str | None, check) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, max_connections, check), nprocs=2, join=True)


CONNECTIONS = pytest.mark.parametrize("max_connections", [None, "1"], ids=["default", "max-connections-1"])


@CONNECTIONS
def test_dynamic_pipeline_over_nccl_matches_static(max_connections):
    _spawn(max_connections, _check)


@CONNECTIONS
def test_crossing_large_sends_complete(max_connections):
    _spawn(max_connections, _crossing)

"""`--use-dpp` over NCCL on 2 GPUs (PP 2 x VPP 2): the CUDA branches of the dynamic executor
(headers copied to pinned memory after their receive completed, receives posted from side
streams, readiness by polling NCCL works and events) give the static schedule's losses and
gradients while a GPU-side straggler (`torch.cuda._sleep` on stage 0) reorders the computes.
Not with CUDA_DEVICE_MAX_CONNECTIONS=1 (one hardware queue for all streams): there the
receives posted ahead stall the compute queued behind them and the step hangs (measured on
2xH200), so pretrain refuses that combination (tests/unit/test_pipeline_dynamic.py).
GPU kernels may sum in another order than the CPU's, so the check is to 1e-5, not bitwise."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST, DEPTH_FIRST, DynamicPlan
from megatron_lite.pipeline_parallel.executor import PipelineConfig
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from tests.distributed.test_pipeline_dynamic import static_order, train_once

pytestmark = pytest.mark.gpu

PP, VPP, M, LAYERS = 2, 2, 8, 8


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
    channels = PipelineChannels.create(ps, ring=True, backend="nccl")
    try:
        static, grads, _, _ = train_once(ps, channels, LAYERS, VPP, M, PipelineConfig(overlap_p2p_comm=True),
                                         device="cuda")
        sleep, reordered = _gpu_sleep(_cycles_per_s()), False
        for order in (BREADTH_FIRST, DEPTH_FIRST):
            for seed in range(3):
                totals, d_grads, seq, peak = train_once(
                    ps, channels, LAYERS, VPP, M, PipelineConfig(dynamic=True, dynamic_order=order),
                    {(0, "F"): 0.004}, seed=seed, device="cuda", sleep=sleep)
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


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        _check(rank)
    finally:
        dist.destroy_process_group()


def test_dynamic_pipeline_over_nccl_matches_static():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port), nprocs=2, join=True)

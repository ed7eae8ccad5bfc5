"""The NCCL branches of tensor_parallel/collectives.py (single-buffer `all_gather_into_tensor` /
`reduce_scatter_tensor`, the `out=` in-place forms, async `Pending`s) on 2 GPUs give exactly
what the same collective computes from every rank's input, for dims 0 and 1 — the CPU tests
only ever reach the gloo fallbacks. The vocab-parallel cross-entropy, whose log-softmax
correction gathers over NCCL, equals spec §11's algorithm on the same shards."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.tensor_parallel import collectives as c
from tests.ce_utils import losses_and_grads_against_spec

pytestmark = pytest.mark.gpu


def _inputs(world: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4 * world, 6, 8, generator=g).cuda()  # [n, a, b]


def _check(rank: int, world: int) -> None:
    x = _inputs(world, rank)
    every = [_inputs(world, r) for r in range(world)]
    total = sum(every)
    group = dist.new_group(list(range(world)))
    assert c.group_size(group) == world and c.group_rank(group) == rank
    torch.testing.assert_close(c.all_reduce(x.clone(), group), total, rtol=1e-6, atol=1e-6)
    for dim in (0, 1):
        assert torch.equal(c.all_gather(x, dim, group), torch.cat(every, dim))
        assert torch.equal(c.all_gather(x, dim, group, async_op=True).wait(), torch.cat(every, dim))
        mine = total.chunk(world, dim)[rank]
        torch.testing.assert_close(c.reduce_scatter(x, dim, group), mine, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c.reduce_scatter(x, dim, group, async_op=True).wait(), mine,
                                   rtol=1e-6, atol=1e-6)
    # In place, as the distributed optimizer's buffers use them: out is this rank's chunk of x.
    flat = x.clone().flatten()
    shard = flat.chunk(world)[rank]
    c.reduce_scatter(flat, 0, group, out=shard)
    torch.testing.assert_close(shard, total.flatten().chunk(world)[rank], rtol=1e-6, atol=1e-6)
    gathered = torch.empty_like(flat)
    own = gathered.chunk(world)[rank]
    own.copy_(shard)
    c.all_gather(own, 0, group, out=gathered)
    torch.testing.assert_close(gathered, total.flatten(), rtol=1e-6, atol=1e-6)


def _check_cross_entropy(rank: int, world: int) -> None:
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(64, 2, 1024 * world, generator=g) * 3).cuda()  # [s, b, V]
    target = torch.randint(0, 1024 * world, (64, 2), generator=g).cuda()
    grad = torch.rand(64, 2, generator=g).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        for smoothing in (0.0, 0.1):
            shard = logits.chunk(world, -1)[rank].to(dtype)  # [s, b, V/tp]
            loss, spec_loss, ours, spec = losses_and_grads_against_spec(shard, target, group, smoothing, grad)
            torch.testing.assert_close(loss, spec_loss, rtol=1e-6, atol=1e-6)
            assert ours.dtype == dtype
            # Both round the same fp32 gradient to bf16 up to a last-place flip.
            tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
            torch.testing.assert_close(ours.float(), spec.float(), **tol)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        _check(rank, world)
        _check_cross_entropy(rank, world)
    finally:
        dist.destroy_process_group()


def test_nccl_collectives_match_their_definition():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port), nprocs=2, join=True)

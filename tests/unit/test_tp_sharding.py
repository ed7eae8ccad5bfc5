"""shard/unshard and the parameter tags of megatron_lite.tensor_parallel.sharding."""
import pytest
import torch

from megatron_lite.tensor_parallel.sharding import mark_parallel, mark_sequence_parallel, shard, unshard


def test_stride_one_takes_contiguous_rows():
    t = torch.arange(24).view(8, 3)
    assert torch.equal(shard(t, 0, 1, 4), torch.tensor([[6, 7, 8], [9, 10, 11]]))
    assert torch.equal(shard(t, 0, 3, 4), torch.tensor([[18, 19, 20], [21, 22, 23]]))


def test_stride_one_along_last_dim():
    t = torch.arange(12).view(2, 6)
    assert torch.equal(shard(t, 1, 0, 3), torch.tensor([[0, 1], [6, 7]]))
    assert torch.equal(shard(t, -1, 2, 3), torch.tensor([[4, 5], [10, 11]]))


def test_stride_two_takes_own_chunk_of_every_part():
    # [gate; up] = [0..3; 4..7]: rank r gets its half of gate, then its half of up.
    t = torch.arange(8)
    assert shard(t, 0, 0, 2, stride=2).tolist() == [0, 1, 4, 5]
    assert shard(t, 0, 1, 2, stride=2).tolist() == [2, 3, 6, 7]
    t = torch.arange(16)
    assert [shard(t, 0, r, 4, stride=2).tolist() for r in range(4)] == [
        [0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]


def test_stride_two_along_dim_one():
    t = torch.arange(16).view(2, 8)
    assert shard(t, 1, 1, 2, stride=2).tolist() == [[2, 3, 6, 7], [10, 11, 14, 15]]


def test_shard_is_a_copy():
    t = torch.arange(8.0)
    s = shard(t, 0, 0, 2)
    s.zero_()
    assert t[0] == 0 and t[1] == 1
    assert s.is_contiguous() and shard(torch.arange(8).view(2, 4), 1, 1, 2).is_contiguous()


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_round_trip(world, stride, dim):
    t = torch.arange(8 * 16 * 3).view(8, 16, 3) if dim != -1 else torch.arange(2 * 3 * 8).view(2, 3, 8)
    shards = [shard(t, dim, r, world, stride) for r in range(world)]
    assert all(s.size(dim) == t.size(dim) // world for s in shards)
    assert torch.equal(unshard(shards, dim, stride), t)
    # Every element lands in exactly one shard.
    assert sorted(torch.cat([s.flatten() for s in shards]).tolist()) == t.flatten().tolist()


def test_stride_differs_from_plain_split():
    t = torch.arange(8)
    shards = [shard(t, 0, r, 2, stride=2) for r in range(2)]
    assert unshard(shards, 0, stride=1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def test_indivisible_raises():
    with pytest.raises(ValueError):
        shard(torch.arange(6), 0, 0, 4)
    with pytest.raises(ValueError):
        shard(torch.arange(8), 0, 0, 2, stride=3)
    with pytest.raises(ValueError):
        shard(torch.arange(8), 0, 2, 2)


def test_tags():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    assert mark_parallel(p, 0, stride=2) is p
    assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, 0, 2)
    q = torch.nn.Parameter(torch.zeros(4))
    assert mark_sequence_parallel(q) is q and q.sequence_parallel is True
    assert not hasattr(q, "tensor_model_parallel")

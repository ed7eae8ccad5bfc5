import pytest

from megatron_lite.distributed.rank_grid import RankGrid, embedding_groups


def test_tp2_pp4_world8():
    grid = RankGrid(tp=2, pp=4, dp=1)
    assert grid.groups("pp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert grid.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid.groups("dp") == [[i] for i in range(8)]
    assert grid.groups("tp-pp") == [list(range(8))]
    assert embedding_groups(grid.groups("pp")) == [[0, 6], [1, 7]]
    assert embedding_groups(grid.groups("pp"), tied=False) == [[0], [1]]


def test_pp8():
    grid = RankGrid(pp=8)
    assert grid.groups("pp") == [list(range(8))]
    assert grid.groups("tp") == [[i] for i in range(8)]
    assert grid.groups("dp") == [[i] for i in range(8)]
    assert embedding_groups(grid.groups("pp")) == [[0, 7]]


def test_tp8_dp2_world16():
    grid = RankGrid(tp=8, dp=2)
    assert grid.groups("tp") == [list(range(8)), list(range(8, 16))]
    assert grid.groups("dp") == [[i, i + 8] for i in range(8)]
    assert grid.groups("pp") == [[i] for i in range(16)]


def test_spec_example_tp2_pp4_dp2():
    grid = RankGrid(tp=2, pp=4, dp=2)
    assert grid.groups("tp") == [[2 * i, 2 * i + 1] for i in range(8)]
    assert grid.groups("dp")[:3] == [[0, 2], [1, 3], [4, 6]]
    assert grid.groups("pp") == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert grid.groups("tp-pp") == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


def test_spec_example_tp2_cp2_dp2():
    grid = RankGrid(tp=2, cp=2, dp=2)
    assert grid.groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid.groups("dp-cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_coords_roundtrip_and_formula():
    grid = RankGrid(tp=2, cp=2, dp=3, pp=2)
    for rank in range(grid.world_size):
        c = grid.coords_of(rank)
        assert rank == c["tp"] + 2 * (c["cp"] + 2 * (c["dp"] + 3 * c["pp"]))
        assert grid.rank_of(c) == rank


def test_every_rank_in_exactly_one_group():
    grid = RankGrid(tp=2, cp=2, dp=2, pp=2)
    for token in ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-dp-cp"):
        flat = sorted(r for g in grid.groups(token) for r in g)
        assert flat == list(range(16)), token


def test_alternative_order_tp_cp_pp_dp():
    grid = RankGrid(tp=2, dp=2, pp=2, order="tp-cp-pp-dp")
    assert grid.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_bad_order_rejected():
    with pytest.raises(ValueError, match="rank order"):
        RankGrid(order="tp-dp-pp")

import torch
import torch.distributed as dist

from megatron_lite.distributed.parallel_state import ParallelState


def _two_layouts(rank, world):
    a = ParallelState.create(tp=2, pp=world // 2)
    b = ParallelState.create(tp=1, pp=world)
    out = {
        "a_tp": a.ranks["tp"], "a_pp": a.ranks["pp"], "a_emb": a.embedding_ranks,
        "b_pp": b.ranks["pp"], "a_coords": (a.tp_rank, a.pp_rank, a.dp_rank),
    }
    # Collectives on both layouts' groups must see only their own members.
    x = torch.tensor([float(rank)])
    dist.all_reduce(x, group=a.tp_group)
    y = torch.tensor([1.0])
    dist.all_reduce(y, group=b.pp_group)
    out["a_tp_sum"], out["b_pp_count"] = x.item(), y.item()
    a.destroy()
    b.destroy()
    return out


def test_two_parallel_states_in_one_world(run_dist):
    results = run_dist(4, _two_layouts)
    assert [r["a_tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["a_pp"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["a_emb"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["b_pp"] == [0, 1, 2, 3] for r in results)
    assert [r["a_coords"] for r in results] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert [r["a_tp_sum"] for r in results] == [1.0, 1.0, 5.0, 5.0]
    assert all(r["b_pp_count"] == 4.0 for r in results)


def test_single_process_state_needs_no_distributed():
    state = ParallelState.create()
    assert (state.tp_size, state.pp_size, state.dp_size, state.world_size) == (1, 1, 1, 1)
    assert state.tp_group is None and state.is_pipeline_first_stage and state.is_pipeline_last_stage

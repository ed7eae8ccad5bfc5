"""--tp-comm-overlap (tensor_parallel/overlap.py) on gloo: the ring collective matmuls equal
all-gather + GEMM, GEMM + reduce-scatter and all-gather + GEMM of the gradient, for TP 2, 3
and 4; and a model step with the overlap equals the step without it (loss exactly, every
gradient to 1e-6) with and without gradient-accumulation fusion, also under pipelining."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from megatron_lite.tensor_parallel import copy_engine
from megatron_lite.tensor_parallel.collectives import all_gather, reduce_scatter
from megatron_lite.tensor_parallel.overlap import all_gather_linear, all_gather_matmul, linear_reduce_scatter
from tests.model_utils import pipeline_step, tiny_config

SEED, SEQ, MICRO, M = 1234, 24, 2, 2


def _primitives(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)  # different local data on every rank
        x_sp = torch.randn(3, 2, 8, generator=g)  # [s/tp, b, in]
        x_full = torch.randn(3 * world, 2, 5, generator=g)  # [s, b, in/tp]
        grad = torch.randn(3, 2, 6, generator=g)  # [s/tp, b, out]
        w_col, bias = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)  # [out/tp, in], [out/tp]
        w_row = torch.randn(6, 5, generator=g)  # [out, in/tp]
        group = ps.tp_group
        got = [all_gather_linear(x_sp, w_col, bias, group), linear_reduce_scatter(x_full, w_row, group),
               *all_gather_matmul(grad, w_row, group)]
        gathered = all_gather(grad, 0, group)
        want = [torch.nn.functional.linear(all_gather(x_sp, 0, group), w_col, bias),
                reduce_scatter(x_full @ w_row.t(), 0, group), gathered, gathered @ w_row]
        return [(a, b) for a, b in zip(got, want)]
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_collective_matmuls_equal_collective_then_gemm(run_dist, world):
    for rank, pairs in enumerate(run_dist(world, _primitives)):
        for i, (got, want) in enumerate(pairs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, r=rank, i=i: f"rank {r} #{i}: {m}")


def _step(ps, channels, family, overlap, fused):
    cfg = tiny_config(family, num_layers=4, hidden_size=32, num_attention_heads=4,
                      max_position_embeddings=SEQ,
                      **({"num_query_groups": 4, "ffn_hidden_size": 48} if family == "llama" else {}),
                      sequence_parallel=True, tp_comm_overlap=overlap, gradient_accumulation_fusion=fused)
    return pipeline_step(cfg, ps, channels, seq=SEQ, micro=MICRO, num_microbatches=M, seed=SEED)


def _run(rank, world, tp, pp):
    out = []
    for family in ("gpt", "llama"):
        ps = ParallelState.create(tp=tp, pp=pp, tied_embeddings=family == "gpt")
        channels = PipelineChannels.create(ps, ring=True) if pp > 1 else None
        try:
            for fused in (False, True):
                out.append({on: _step(ps, channels, family, on, fused) for on in (False, True)})
        finally:
            if channels is not None:
                channels.destroy()
            ps.destroy()
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (2, 2)], ids=["tp2", "tp4", "tp2-pp2"])
def test_model_step_with_overlap_equals_without(run_dist, tp, pp):
    for rank, cases in enumerate(run_dist(tp * pp, _run, tp, pp)):
        for case, per in enumerate(cases):
            (ref_totals, ref_grads), (totals, grads) = per[False], per[True]
            what = f"tp{tp} pp{pp} rank {rank} case {case}"
            # The forward sums partials in ring order instead of gloo's: equal to fp32 rounding.
            torch.testing.assert_close(totals, ref_totals, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, w=what: f"{w}: {m}")
            assert grads.keys() == ref_grads.keys()
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, w=what, n=name: f"{w} {n}: {m}")


def _copy_engine_usable(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        return copy_engine.usable(torch.zeros(4), ps.tp_group)
    finally:
        ps.destroy()


def test_cpu_tensors_take_the_p2p_ring(run_dist):
    """The copy-engine transfers (copy_engine.py) serve CUDA tensors of an NCCL group inside
    one node only; gloo keeps the p2p ring these tests check."""
    assert run_dist(2, _copy_engine_usable) == [False, False]


def _regions_used(rank, world, tp, pp, vpp, family, recompute):
    """The copy-engine workspace region of every overlapped transfer of one step, in program
    order, recorded where layers.py calls the collective matmuls (gloo runs the ring, which
    ignores the region, but the order is the one a GPU would see)."""
    from megatron_lite.tensor_parallel import layers

    used = []
    originals = layers.all_gather_matmul, layers.linear_reduce_scatter

    def gather(g, weight, group, bias=None, region=copy_engine.FENCED):
        used.append(region)
        return originals[0](g, weight, group, bias, region=region)

    def scatter(x, weight, group, region=copy_engine.FENCED):
        used.append(region)
        return originals[1](x, weight, group, region=region)

    layers.all_gather_matmul, layers.linear_reduce_scatter = gather, scatter
    ps = ParallelState.create(tp=tp, pp=pp, tied_embeddings=family == "gpt")
    channels = PipelineChannels.create(ps, ring=vpp > 1) if pp > 1 else None
    try:
        extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1} \
            if recompute else {}
        if family == "llama":
            extra.update(num_query_groups=4, ffn_hidden_size=48)
        cfg = tiny_config(family, num_layers=4, hidden_size=32, num_attention_heads=4,
                          max_position_embeddings=SEQ, sequence_parallel=True, tp_comm_overlap=True, **extra)
        pipeline_step(cfg, ps, channels, vpp=vpp, seq=SEQ, micro=MICRO, num_microbatches=4, seed=SEED)
        return used, ps.pp_rank
    finally:
        layers.all_gather_matmul, layers.linear_reduce_scatter = originals
        if channels is not None:
            channels.destroy()
        ps.destroy()


@pytest.mark.parametrize("tp,pp,vpp,family,recompute", [
    (2, 1, 1, "gpt", False), (2, 1, 1, "llama", True), (2, 2, 2, "gpt", False), (2, 2, 2, "llama", True),
], ids=["tp2-gpt", "tp2-llama-recompute", "tp2-pp2-vpp2-gpt", "tp2-pp2-vpp2-llama-recompute"])
def test_alternating_regions_never_repeat(run_dist, tp, pp, vpp, family, recompute):
    """Transfers in FIRST or SECOND skip the barrier that waits for the previous readers, which
    is safe only if no two consecutive transfers use the same one of them (copy_engine.py). The
    output layer (tied or not) gathers by a collective matmul too, FENCED, on the last stage."""
    for used, pp_rank in run_dist(tp * pp, _regions_used, tp, pp, vpp, family, recompute):
        assert copy_engine.FIRST in used and copy_engine.SECOND in used, used
        assert (copy_engine.FENCED in used) == (pp_rank == pp - 1), (pp_rank, used)
        for i, (a, b) in enumerate(zip(used, used[1:])):
            assert a == copy_engine.FENCED or a != b, f"pipeline rank {pp_rank}, transfer {i}: {used}"

"""Context parallelism equals the single-process model (spec §9): summed loss, per-micro-batch
evaluation losses and every parameter gradient, for CP 2 and 4 with each --cp-comm-type, GPT
(learned positions) and Llama (RoPE, GQA), and CP composed with TP+SP, PP (with VPP), DP and
per-token loss; CP x DP with the distributed optimizer trains to the same weights.

Micro-batches are read on CP rank 0 only and broadcast (ContextParallelBatches)."""
import pytest
import torch
import torch.distributed as dist

from megatron_lite.context_parallel.split import ContextParallelBatches
from megatron_lite.data.mock import MockTokens
from megatron_lite.data.samplers import micro_batch_iterator
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.data_parallel.finalize import finalize_grads
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.models.init import gather_global
from megatron_lite.optimizer.core import OptimizerConfig
from megatron_lite.optimizer.distributed import DistributedOptimizer
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer
from megatron_lite.pipeline_parallel.chunks import build_model_chunks
from megatron_lite.pipeline_parallel.executor import PipelineConfig, PipelineExecutor
from megatron_lite.pipeline_parallel.layout import build_layout
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from megatron_lite.training.train_step import forward_backward, train_step
from tests.model_utils import dense_reference, tiny_config

SEED, SEQ, MICRO, LAYERS, M = 1234, 16, 2, 4, 2
CPU = torch.device("cpu")


def _config(family, comm_type, sp=False):
    """`family`: gpt or llama, "+recompute" for full recompute (attention kept, core.py)."""
    family, _, recompute = family.partition("+")
    extra = {"num_query_groups": 2, "ffn_hidden_size": 48} if family == "llama" else {}
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return tiny_config(family, num_layers=LAYERS, hidden_size=32, num_attention_heads=4, sequence_parallel=sp,
                       cp_comm_type=tuple(comm_type), **extra)


def _data(ps, seed=SEED):
    source = None
    if ps.cp_rank == 0:
        source = micro_batch_iterator(MockTokens(64, SEQ, 128, seed), 0, MICRO, ps.dp_rank, ps.dp_size)
    return ContextParallelBatches(source, ps.cp_group, ps.ranks["cp"], ps.cp_rank, MICRO, SEQ, CPU)


def _case(ps, channels, family, comm_type, vpp, per_token):
    cfg = _config(family, comm_type, sp=ps.tp_size > 1)
    layout = build_layout(LAYERS, ps.pp_size, vpp)
    chunks = build_model_chunks(cfg, ps, layout, SEED, build_rng_tracker(SEED, ps.tp_rank, ps.pp_rank, "cpu"))
    ddp = [DistributedDataParallel(c, ps, DDPConfig(overlap_grad_reduce=True, bucket_size=4000,
                                                    calculate_per_token_loss=per_token)) for c in chunks]
    executor = PipelineExecutor(ddp, ps, PipelineConfig(calculate_per_token_loss=per_token), channels)
    for c in ddp:
        c.zero_grad_buffer()
    executor.train()
    totals = forward_backward(executor, _data(ps), M, ps).totals
    finalize_grads(ddp, ps, num_tokens=totals[1] if per_token else None)
    evaluation = forward_backward(executor, _data(ps), M, ps, forward_only=True).losses
    last = ps.is_pipeline_last_stage
    if last:  # per-micro-batch (loss sum, tokens) summed over the CP ranks' shares
        evaluation = torch.stack(evaluation)
        dist.all_reduce(evaluation, group=ps.cp_group)
    dist.all_reduce(totals, group=ps.dp_cp_group)
    grads = {}
    for c in chunks:
        grads.update(gather_global(c, ps.tp_group, grads=True))
    return {"totals": totals if last else None, "eval": evaluation if last else None, "grads": grads,
            "dp_rank": ps.dp_rank}


def _run(rank, world, tp, cp, pp, hierarchical, cases):
    out = []
    for family, comm_type, vpp, per_token in cases:
        ps = ParallelState.create(tp=tp, cp=cp, pp=pp, tied_embeddings=family.startswith("gpt"),
                                  hierarchical_cp=hierarchical)
        channels = PipelineChannels.create(ps, ring=vpp > 1) if pp > 1 else None
        try:
            out.append(_case(ps, channels, family, comm_type, vpp, per_token))
        finally:
            if channels is not None:
                channels.destroy()
            ps.destroy()
    return out


_REFERENCE = {}


def _reference(family, m_global):
    family = family.partition("+")[0]
    key = (family, m_global)
    if key not in _REFERENCE:
        data = micro_batch_iterator(MockTokens(64, SEQ, 128, SEED), 0, MICRO, 0, 1)
        _REFERENCE[key] = dense_reference(_config(family, ["p2p"]), data, m_global, SEED)
    return _REFERENCE[key]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda msg: f"{what}: {msg}")


def _check(results, cases, dp):
    for c, (family, comm_type, vpp, per_token) in enumerate(cases):
        ref_totals, ref_per_mb, ref_grads = _reference(family, M * dp)
        seen = set()
        for rank, per_case in enumerate(results):
            r, what = per_case[c], f"{family} {comm_type} vpp {vpp} per-token {per_token} rank {rank}"
            if r["totals"] is not None:
                _close(r["totals"], ref_totals, f"{what} loss")
                d = r["dp_rank"]
                _close(r["eval"], torch.stack(ref_per_mb[d::dp]), f"{what} eval losses")
            for name, g in r["grads"].items():
                _close(g, ref_grads[name], f"{what} grad {name}")
                seen.add(name)
        assert seen == set(ref_grads), f"{family} {comm_type}: missing {set(ref_grads) - seen}"


ALL_TYPES = (["p2p"], ["all_gather"], ["a2a"])


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_matches_single_process(run_dist, cp):
    cases = [(f, t, 1, False) for f in ("gpt", "llama") for t in ALL_TYPES]
    cases.append(("llama", ["p2p", "a2a", "all_gather", "p2p"], 1, True))  # one type per layer
    # Full recompute that keeps the attention output: the recompute replays it (core.py).
    cases += [("llama+recompute", t, 1, False) for t in ALL_TYPES]
    _check(run_dist(cp, _run, 1, cp, 1, None, cases), cases, 1)


def test_hierarchical_cp_2x2_matches_single_process(run_dist):
    cases = [(f, ["a2a+p2p"], 1, False) for f in ("gpt", "llama", "llama+recompute")]
    _check(run_dist(4, _run, 1, 4, 1, (2, 2), cases), cases, 1)


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
                         ids=["cp2-tp2-sp", "cp2-pp2", "cp2-dp2"])
def test_cp2_composes(run_dist, tp, pp, dp):
    vpp = 2 if pp > 1 else 1
    cases = [(f, t, vpp, False) for f in ("gpt", "llama") for t in (["p2p"], ["a2a"])]
    cases.append(("llama", ["all_gather"], vpp, True))
    cases.append(("gpt+recompute", ["p2p"], vpp, False))
    _check(run_dist(2 * tp * pp * dp, _run, tp, 2, pp, None, cases), cases, dp)


@pytest.mark.parametrize("sizes", [(1, 2), (2, 1)], ids=["ring-only", "a2a-only"])
def test_hierarchical_cp_degenerate_levels(run_dist, sizes):
    cases = [("llama", ["a2a+p2p"], 1, False)]
    _check(run_dist(2, _run, 1, 2, 1, sizes, cases), cases, 1)


def _train(rank, world, cp, dp, distributed_optimizer):
    """Three Adam steps of Llama (GQA) at CP x DP; 4 micro-batches per global batch."""
    ps = ParallelState.create(cp=cp)
    try:
        cfg = _config("llama", ["p2p"])
        model = build_model_chunks(cfg, ps, build_layout(LAYERS, 1, None), SEED,
                                   build_rng_tracker(SEED, 0, 0, "cpu"))[0]
        ddp = DistributedDataParallel(model, ps, DDPConfig(
            use_distributed_optimizer=distributed_optimizer, overlap_grad_reduce=True, bucket_size=4000))
        # eps 1e-4: Adam with a tiny eps turns fp32 reduction-order noise in near-zero grads
        # into lr-sized steps (DP4 alone differs by 2e-4 then), which would hide real errors.
        ocfg = OptimizerConfig(lr=1e-2, clip_grad=1.0, adam_eps=1e-4)
        opt = (DistributedOptimizer([ddp], ocfg, ps) if distributed_optimizer
               else MixedPrecisionOptimizer(model.named_parameters(), ocfg, ps))
        data, losses = _data(ps), []
        for _ in range(3):
            r = train_step(ddp, opt, data, 4 // dp, ps, CPU)
            losses.append(float(r.loss_sum_count[0] / r.loss_sum_count[1]))
        ddp.finish_param_sync()
        return losses, gather_global(model, ps.tp_group)
    finally:
        ps.destroy()


def test_cp2_dp2_distributed_optimizer_trains_like_one_process(run_dist):
    ref_losses, ref_params = run_dist(1, _train, 1, 1, False)[0]
    for losses, params in run_dist(4, _train, 2, 2, True):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for name, p in params.items():
            _close(p, ref_params[name], f"param {name}")

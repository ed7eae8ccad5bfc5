"""Pipeline parallelism (1F1B and interleaved, with TP, SP and DP) equals the single-process
model: loss, per-micro-batch evaluation losses and every parameter gradient (spec §5.3, §6).

Each world runs several cases in one task (GPT with tied embeddings and sequence parallelism,
Llama untied; VPP 1 and 2; group sizes, p2p overlap and uneven layouts), so that process and
group start-up is paid once per world size."""
import pytest
import torch
import torch.distributed as dist

from megatron_lite.data.mock import MockTokens
from megatron_lite.data.samplers import micro_batch_iterator
from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.data_parallel.finalize import finalize_grads
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.models.init import gather_global
from megatron_lite.pipeline_parallel.chunks import build_model_chunks
from megatron_lite.pipeline_parallel.executor import PipelineConfig, PipelineExecutor
from megatron_lite.pipeline_parallel.layout import build_layout
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from megatron_lite.pipeline_parallel.schedules import in_flight_bound
from megatron_lite.training.train_step import forward_backward
from tests.model_utils import dense_reference, tiny_config

SEED, SEQ, MICRO = 1234, 16, 2


def _config(family, layers, sp):
    return tiny_config(family, num_layers=layers, hidden_size=32, num_attention_heads=4,
                       **({"num_query_groups": 2, "ffn_hidden_size": 48} if family == "llama" else {}),
                       sequence_parallel=sp)


def _data(dp_rank, dp_size, seed=SEED):
    return micro_batch_iterator(MockTokens(64, SEQ, 128, seed), 0, MICRO, dp_rank, dp_size)


def _case(ps, channels, case):
    family, layers, vpp, m, layout_kw, pcfg = case
    cfg = _config(family, layers, sp=ps.tp_size > 1 and family == "gpt")
    layout = build_layout(layers, ps.pp_size, vpp, **layout_kw)
    tracker = build_rng_tracker(SEED, ps.tp_rank, ps.pp_rank, "cpu")
    chunks = build_model_chunks(cfg, ps, layout, SEED, tracker)
    # With DP, buckets reduce while the schedule runs: sync switches on before each chunk's last
    # backward (executor GradSyncHooks), and a bucket launches once its last grad arrives.
    dcfg = DDPConfig(overlap_grad_reduce=ps.dp_size > 1, bucket_size=4000 if ps.dp_size > 1 else None,
                     calculate_per_token_loss=pcfg.calculate_per_token_loss)
    ddp = [DistributedDataParallel(c, ps, dcfg) for c in chunks]
    executor = PipelineExecutor(ddp, ps, pcfg, channels)
    for c in ddp:
        c.zero_grad_buffer()
    executor.train()
    result = forward_backward(executor, _data(ps.dp_rank, ps.dp_size), m, ps)
    totals = result.totals
    # Activations held at once match the schedule's bound; sent outputs keep no data
    # (deallocated: 4 bytes each), only the last stage's scalar losses remain.
    bound = in_flight_bound(ps.pp_size, vpp, m, ps.pp_rank, pcfg.microbatch_group_size)
    assert result.peak_in_flight == bound, (result.peak_in_flight, bound)
    assert result.peak_output_bytes <= 4 * bound, result.peak_output_bytes
    finalize_grads(ddp, ps, num_tokens=totals[1] if pcfg.calculate_per_token_loss else None)
    evaluation = forward_backward(executor, _data(ps.dp_rank, ps.dp_size), m, ps, forward_only=True).losses
    if ps.dp_size > 1:
        dist.all_reduce(totals, group=ps.dp_cp_group)
    grads = {}
    for c in chunks:
        grads.update(gather_global(c, ps.tp_group, grads=True))
    last = ps.is_pipeline_last_stage
    return {"totals": totals if last else None, "eval": [e.clone() for e in evaluation] if last else None,
            "grads": grads, "dp_rank": ps.dp_rank}


def _run(rank, world, tp, pp, cases):
    results = {}
    for tied in (True, False):  # the embedding group spans first and last stage only if tied
        mine = [i for i, case in enumerate(cases) if (case[0] == "gpt") == tied]
        if not mine:
            continue
        ps = ParallelState.create(tp=tp, pp=pp, tied_embeddings=tied)
        channels = PipelineChannels.create(ps, ring=True)
        try:
            results.update({i: _case(ps, channels, cases[i]) for i in mine})
        finally:
            channels.destroy()
            ps.destroy()
    return [results[i] for i in range(len(cases))]


_REFERENCE = {}


def _reference(family, layers, m_global):
    """Single process, no pipelining, a plain loop: loss totals, per-micro-batch losses and
    gradients by global name."""
    key = (family, layers, m_global)
    if key not in _REFERENCE:
        _REFERENCE[key] = dense_reference(_config(family, layers, sp=False), _data(0, 1), m_global, SEED)
    return _REFERENCE[key]


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda msg: f"{what}: {msg}")


def _check(results, cases, dp):
    for c, case in enumerate(cases):
        family, layers, _, m, _, _ = case
        ref_totals, ref_per_mb, ref_grads = _reference(family, layers, m * dp)
        seen = set()
        for rank, per_case in enumerate(results):
            r = per_case[c]
            what = f"case {case[:5]} rank {rank}"
            if r["totals"] is not None:
                _close(r["totals"], ref_totals, f"{what} loss")
                d = r["dp_rank"]  # micro-step i holds global micro-batch i * dp + d
                _close(torch.stack(r["eval"]), torch.stack(ref_per_mb[d::dp]), f"{what} eval losses")
            for name, g in r["grads"].items():
                _close(g, ref_grads[name], f"{what} grad {name}")
                seen.add(name)
        assert seen == set(ref_grads), f"{case[:5]}: missing {set(ref_grads) - seen}"


def _cases(pp):
    cfg = PipelineConfig()
    cases = [(f, 8, vpp, 4, {}, cfg) for f in ("gpt", "llama") for vpp in (1, 2)]
    if pp == 2:
        cases += [
            # breadth-first interleaving (N = M) with p2p overlap, an M that is not a multiple of PP
            ("gpt", 8, 2, 5, {}, PipelineConfig(microbatch_group_size=5, overlap_p2p_comm=True)),
            # uneven stages, and embedding/loss counted as layers (stage 0 and 3 hold one layer)
            ("llama", 8, 1, 3, {"first_stage_layers": 3, "last_stage_layers": 5}, cfg),
            ("gpt", 6, 2, 4, {"account_for_embedding": True, "account_for_loss": True},
             PipelineConfig(overlap_p2p_comm=True)),
            # --pipeline-model-parallel-layout: rank 0 holds 3 + 2 layers, rank 1 1 + 2 and the loss
            ("llama", 8, 2, 4, {"layout": "Et*3|t|t*2|t*2L"}, cfg),
            # raw loss sums back-propagated, grads divided by the token count broadcast from the
            # last stage (spec §6.4; mock data masks nothing, so it equals the mean of means)
            ("llama", 8, 2, 4, {}, PipelineConfig(calculate_per_token_loss=True)),
        ]
    return cases


@pytest.mark.parametrize("tp,pp,dp", [(1, 2, 1), (2, 2, 1), (1, 4, 1), (2, 4, 1), (1, 2, 2), (2, 2, 2)],
                         ids=["pp2", "pp2-tp2", "pp4", "pp4-tp2", "pp2-dp2", "pp2-tp2-dp2"])
def test_pipeline_matches_single_process(run_dist, tp, pp, dp):
    cases = _cases(pp)
    if dp > 1:  # the four basic cases plus per-token loss
        cases = cases[:4] + [c for c in cases[4:] if c[5].calculate_per_token_loss]
    results = run_dist(tp * pp * dp, _run, tp, pp, cases)
    _check(results, cases, dp)

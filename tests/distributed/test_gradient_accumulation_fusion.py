"""Gradient-accumulation fusion (fused/wgrad.py) changes nothing but where the weight and bias
gradients are summed: with it on and off, in the same process, the loss and every main_grad after the
DP/TP/embedding fix-ups agree to 1e-6 (fp32), for TP 1/2 with sequence parallelism, DP 2
with overlapped bucket reduction, PP 2 with the tied embedding split across stages (each copy
fused: the last stage's GEMM, the first stage's lookup), the tied head on one stage (the GEMM
and the lookup both adding to the one main_grad, the head whole or in sequence chunks),
interleaving, full recompute and several micro-batches. Biases (GPT's) fuse too. The fused
path is also checked to run: one wgrad GEMM per fused weight (per loss chunk for the head)
and one bias accumulation per bias, each micro-batch."""
import pytest
import torch

import megatron_lite.tensor_parallel.layers as layers
from megatron_lite.data_parallel.ddp import DDPConfig
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.output_loss import ChunkLimits
from megatron_lite.pipeline_parallel.p2p import PipelineChannels
from tests.model_utils import pipeline_step, tiny_config

SEED, SEQ, MICRO, M = 1234, 16, 2, 4
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
# micro * V/tp = 256 / tp logits per position: chunks of 4 * tp positions, 4 / tp chunks over SEQ
CHUNKED = {"loss_chunk_limits": ChunkLimits(whole_max_elements=0, chunk_max_elements=4 * 256)}


def _step(ps, channels, family, vpp, fused, model_kw):
    model_kw = dict(model_kw)
    limits = model_kw.pop("loss_chunk_limits", None)
    cfg = tiny_config(family, num_layers=4, hidden_size=32, num_attention_heads=4,
                      **({"num_query_groups": 2, "ffn_hidden_size": 48} if family == "llama" else {}),
                      sequence_parallel=ps.tp_size > 1, gradient_accumulation_fusion=fused, **model_kw)
    dcfg = DDPConfig(overlap_grad_reduce=ps.dp_size > 1, bucket_size=3000 if ps.dp_size > 1 else None)
    return pipeline_step(cfg, ps, channels, vpp=vpp, ddp_config=dcfg, seq=SEQ, micro=MICRO,
                         num_microbatches=M, seed=SEED, loss_chunk_limits=limits)


def _run(rank, world, tp, pp, cases):
    calls, bias_calls = [], []
    real, real_bias = layers.accumulate_wgrad_, layers.accumulate_bgrad_

    def counting(main_grad, g, x):
        calls.append(main_grad.shape)
        real(main_grad, g, x)

    def counting_bias(main_grad, g):
        bias_calls.append(main_grad.shape)
        real_bias(main_grad, g)

    layers.accumulate_wgrad_, layers.accumulate_bgrad_ = counting, counting_bias
    out = []
    try:
        for family, vpp, model_kw in cases:
            ps = ParallelState.create(tp=tp, pp=pp, tied_embeddings=family == "gpt")
            channels = PipelineChannels.create(ps, ring=True) if pp > 1 else None
            try:
                per = {"pp_rank": ps.pp_rank}
                for fused in (False, True):
                    calls.clear()
                    bias_calls.clear()
                    per[fused] = (*_step(ps, channels, family, vpp, fused, model_kw), len(calls),
                                  len(bias_calls))
                out.append(per)
            finally:
                if channels is not None:
                    channels.destroy()
                ps.destroy()
    finally:
        layers.accumulate_wgrad_, layers.accumulate_bgrad_ = real, real_bias
    return out


def _fused_weights_per_microbatch(family, tp, pp, pp_rank, model_kw):
    """Linear weights of this rank's layers (qkv, proj, fc1, fc2) plus its head on the last
    stage: untied, the last stage's copy of the tied embedding (PP > 1), or the tied table
    of this stage's lookup (PP = 1), this one once per loss chunk."""
    heads = 0
    if pp_rank == pp - 1:
        heads = 4 // tp if "loss_chunk_limits" in model_kw else 1
    return 4 * (4 // pp) + heads


CASES = [("gpt", 1, {}), ("llama", 1, {}), ("gpt", 1, RECOMPUTE)]


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 2), (2, 2, 1)],
                         ids=["single", "tp2-sp", "dp2", "pp2", "tp2-dp2", "tp2-pp2"])
def test_fused_weight_gradients_equal_unfused(run_dist, tp, pp, dp):
    cases = CASES + ([("llama", 2, {})] if pp == 2 else [("gpt", 1, CHUNKED)])
    world = tp * pp * dp
    results = [_run(0, 1, tp, pp, cases)] if world == 1 else run_dist(world, _run, tp, pp, cases)
    for rank, per_case in enumerate(results):
        for (family, vpp, kw), per in zip(cases, per_case):
            what = f"tp{tp} pp{pp} dp{dp} rank {rank} {family} vpp{vpp} {sorted(kw)}"
            (ref_totals, ref_grads, ref_calls, ref_bias), (totals, grads, calls, bias) = per[False], per[True]
            assert ref_calls == ref_bias == 0, what
            # GPT's linears have biases (qkv, proj, fc1, fc2 per layer), Llama's none
            assert bias == (M * 4 * (4 // pp) if family == "gpt" else 0), (what, bias)
            expected = M * _fused_weights_per_microbatch(family, tp, pp, per["pp_rank"], kw)
            assert calls == expected, (what, calls)
            torch.testing.assert_close(totals, ref_totals, rtol=0, atol=0,
                                       msg=lambda m, w=what: f"{w} loss: {m}")
            assert grads.keys() == ref_grads.keys()
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-6,
                                           msg=lambda m, w=what, n=name: f"{w} grad {n}: {m}")

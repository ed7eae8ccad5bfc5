"""`--use-torch-fsdp2` (PyTorch's FSDP2 on gloo/CPU) trains like one process with the same global
batch: losses, grad norms and every parameter after a few optimizer steps, at DP 2 and 4 and
DP2 x TP2 (with sequence parallelism), GPT (tied head, biases, LayerNorm) and Llama (untied,
RMSNorm, SwiGLU: fc1 sharded on its input dim), with full recompute and per-token loss, and
in bf16; each rank holds 1/DP of the parameters and of the optimizer state."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.training.train_step import evaluation_step, train_step
from tests.distributed.test_data_parallel import _reference, _run_variants, assert_same_training
from tests.dp_utils import CPU, micro_batches, num_microbatches
from tests.fsdp_utils import build_fsdp, train_fsdp

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
VARIANTS = {
    "plain": ({}, {}),
    "recompute": (RECOMPUTE, {}),
    "per-token": ({}, {"calculate_per_token_loss": True}),
    "no-reshard-after-forward": ({}, {"reshard_after_forward": False}),
}


def _run(rank, world, tp, names, family="gpt", model_kw=None):
    ps = ParallelState.create(tp=tp)
    try:
        out = {}
        for name in names:
            mkw, fkw = VARIANTS[name]
            out[name] = train_fsdp(ps, {**(model_kw or {}), **mkw}, fkw, family=family)
        return out
    finally:
        ps.destroy()


_LLAMA_REFERENCE = {}


def _llama_reference():
    if "ref" not in _LLAMA_REFERENCE:
        _LLAMA_REFERENCE["ref"] = _run_variants(0, 1, 1, ["plain"], family="llama")["plain"]
    return _LLAMA_REFERENCE["ref"]


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 1), (4, 2)], ids=["dp2", "dp4", "dp2xtp2"])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_fsdp2_matches_single_process(run_dist, world, tp, family):
    ref = _reference() if family == "gpt" else _llama_reference()
    names = list(VARIANTS) if world == 2 or tp == 2 else ["plain"]
    for rank, per_variant in enumerate(run_dist(world, _run, tp, names, family)):
        for name, got in per_variant.items():
            assert_same_training(got, ref, f"fsdp2 world {world} tp {tp} {family} {name} rank {rank}")


def _run_bf16(rank, world, reduce_in_fp32):
    ps = ParallelState.create()
    try:
        return train_fsdp(ps, {"params_dtype": torch.bfloat16}, {"grad_reduce_in_fp32": reduce_in_fp32})
    finally:
        ps.destroy()


@pytest.mark.parametrize("reduce_in_fp32", [True, False], ids=["fp32-reduce", "bf16-reduce"])
def test_bf16_fsdp2_tracks_single_process(run_dist, reduce_in_fp32):
    """bf16 all-gathers of the fp32 master shards; gradients reduce-scattered in fp32 (or bf16
    with --grad-reduce-in-bf16) into fp32 shards: bf16 resolution of the bf16 DDP run."""
    ref = _reference({"params_dtype": torch.bfloat16})
    tol = dict(rtol=1e-3, atol=1e-3, param_atol=1e-2) if reduce_in_fp32 else \
        dict(rtol=1e-2, atol=1e-2, param_atol=2e-2)
    for rank, got in enumerate(run_dist(2, _run_bf16, reduce_in_fp32)):
        assert_same_training(got, ref, f"bf16 fsdp2 rank {rank}", **tol)


def _sizes(rank, world, tp):
    ps = ParallelState.create(tp=tp)
    try:
        model, chunk, opt = build_fsdp(ps)
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        train_step(chunk, opt, data, num_microbatches(ps), ps, CPU)  # Adam state exists after a step
        local = sum(p.to_local().numel() for p in model.parameters())
        tp_local = sum(p.numel() for p in model.parameters())  # a DTensor's numel is its global size
        dtypes = {p.to_local().dtype for p in model.parameters()}
        return local, tp_local, opt.state_bytes(), dtypes
    finally:
        ps.destroy()


def test_each_rank_holds_its_share(run_dist):
    for rank, (local, tp_local, state, dtypes) in enumerate(run_dist(4, _sizes, 1)):
        # dim-0 chunks round up: a little over a quarter, never less.
        assert tp_local / 4 <= local <= 1.02 * tp_local / 4, f"rank {rank}: {local} of {tp_local}"
        assert state == 8 * local  # two fp32 Adam moments per local element
        assert dtypes == {torch.float32}


def _norms_around_evaluation(rank, world, fsdp_eval):
    ps = ParallelState.create()
    try:
        model, chunk, opt = build_fsdp(ps, family="llama")
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        held_out = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size, seed=99)
        norms = []
        for i in range(3):
            norms.append(train_step(chunk, opt, data, num_microbatches(ps), ps, CPU).grad_norm.item())
            if fsdp_eval and i == 0:
                evaluation_step(chunk, held_out, 1, ps, CPU)
        return norms
    finally:
        ps.destroy()


def test_an_evaluation_between_steps_changes_nothing(run_dist):
    """A forward-only pass leaves the last layer and the root gathered; the next step must
    gather and reduce-scatter them as usual (FullyShardedChunk.train reshards them)."""
    assert run_dist(2, _norms_around_evaluation, False) == run_dist(2, _norms_around_evaluation, True)


def _all_gathers_per_step(rank, world, reshard_after_forward):
    """FSDP2 all-gathers in one step of 4 micro-batches (2 layers + the root unit)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as group_module

    ps = ParallelState.create()
    gather, count = group_module.foreach_all_gather, [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return gather(*args, **kwargs)

    group_module.foreach_all_gather = counting
    try:
        model, chunk, opt = build_fsdp(ps, fsdp_kw={"reshard_after_forward": reshard_after_forward})
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        assert num_microbatches(ps) == 4
        train_step(chunk, opt, data, num_microbatches(ps), ps, CPU)
        return count[0]
    finally:
        group_module.foreach_all_gather = gather
        ps.destroy()


@pytest.mark.parametrize("reshard_after_forward,gathers", [(True, 10), (False, 3)],
                         ids=["zero3", "no-reshard-after-forward"])
def test_micro_batches_do_not_gather_more_than_needed(run_dist, reshard_after_forward, gathers):
    """ZeRO-3: the first micro-batch gathers the root, layer 0 (forward and backward) and the
    last layer (kept from forward to backward): 4; the next three find the root and layer 0
    still gathered from their backward and gather layer 0 (backward) and layer 1: 2 each.
    Without resharding after forward every unit is gathered once in the step: 3, then none."""
    assert run_dist(2, _all_gathers_per_step, reshard_after_forward) == [gathers, gathers]

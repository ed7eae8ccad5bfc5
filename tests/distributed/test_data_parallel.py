"""Data parallelism equals one process with the same global batch: loss curve, grad norm and
every parameter after a few optimizer steps, for DP = 1, 2, 4 and DP=2 x TP=2, with plain
DDP, overlapped bucketed reduction, the distributed optimizer with overlapped param gathers,
and per-token loss; and bucket reductions start during the last micro-batch's backward only."""
import contextlib

import pytest
import torch

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.init import gather_global
from tests.dp_utils import micro_batches, train
from tests.model_utils import build, tiny_config

BUCKET = 20_000  # elements: the tiny GPT (110k params) splits into 4 buckets

VARIANTS = {
    "plain": {},
    "overlap": dict(overlap_grad_reduce=True, bucket_size=BUCKET),
    "distopt": dict(use_distributed_optimizer=True),
    "distopt-overlap": dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                            overlap_param_gather=True, bucket_size=BUCKET),
    "per-token": dict(calculate_per_token_loss=True, overlap_grad_reduce=True, bucket_size=BUCKET),
}


def _run_variants(rank, world, tp, names, model_kw=None, family="gpt"):
    ps = ParallelState.create(tp=tp)
    try:
        return {name: train(ps, VARIANTS[name], model_kw, family=family) for name in names}
    finally:
        ps.destroy()


_REFERENCE = {}


def _reference(model_kw=None):
    key = tuple(sorted((model_kw or {}).items()))
    if key not in _REFERENCE:
        _REFERENCE[key] = _run_variants(0, 1, 1, ["plain"], model_kw)["plain"]
    return _REFERENCE[key]


def assert_same_training(got, ref, what, rtol=1e-5, atol=1e-6, param_atol=5e-5):
    losses, norms, params = got
    ref_losses, ref_norms, ref_params = ref
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} losses: {m}")
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} grad norms: {m}")
    assert params.keys() == ref_params.keys()
    # Adam turns a last-bit difference of a near-zero gradient into an update of up to lr
    # (1e-3) in the worst case; 5e-5 absolute is 5% of one step, far below any real error.
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], rtol=rtol, atol=param_atol,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 1), (4, 1), (4, 2)], ids=["dp1", "dp2", "dp4", "dp2xtp2"])
def test_data_parallel_matches_single_process(run_dist, world, tp):
    ref = _reference()
    names = list(VARIANTS)
    results = [_run_variants(0, 1, 1, names)] if world == 1 else run_dist(world, _run_variants, tp, names)
    for rank, per_variant in enumerate(results):
        for name, got in per_variant.items():
            assert_same_training(got, ref, f"world {world} tp {tp} {name} rank {rank}")


def test_bf16_distributed_optimizer_tracks_single_process(run_dist):
    """bf16 params, fp32 main params and grads: the sharded fp32 masters are cast back into
    the param buffer and gathered. Only the fp32 grad sums differ in order, so the runs agree
    to bf16 resolution."""
    bf16 = {"params_dtype": torch.bfloat16}
    ref = _reference(bf16)
    for rank, got in enumerate(run_dist(2, _run_variants, 1, ["distopt-overlap", "overlap"], bf16)):
        for name, run in got.items():
            assert_same_training(run, ref, f"bf16 {name} rank {rank}", rtol=1e-3, atol=1e-3, param_atol=1e-2)


def _run_llama_small_buckets(rank, world):
    ps = ParallelState.create()
    try:
        # 8192 elements: the untied output layer (128 x 64) fills bucket 0 on its own, so only
        # its own forward pre-hook can wait for its gather.
        kw = dict(VARIANTS["distopt-overlap"], bucket_size=8192)
        return train(ps, kw, family="llama")
    finally:
        ps.destroy()


def test_param_gather_overlap_waits_for_a_bucket_holding_only_the_output_layer(run_dist):
    ref = _run_variants(0, 1, 1, ["plain"], family="llama")["plain"]
    for rank, got in enumerate(run_dist(2, _run_llama_small_buckets)):
        assert_same_training(got, ref, f"llama rank {rank}")


def _launches(rank, world, overlap, num_micro=3):
    """Backward over `num_micro` micro-batches; records (micro-batch, bucket, grads already
    accumulated in this backward) at every bucket launch."""
    ps = ParallelState.create()
    try:
        model = build(tiny_config("gpt"), ps)
        ddp = DistributedDataParallel(model, ps, DDPConfig(overlap_grad_reduce=overlap, bucket_size=BUCKET))
        now = {"micro": None, "grads": 0}
        events, launch = [], ddp._launch

        def record(sync):
            events.append((now["micro"], sync.bucket.index, now["grads"]))
            launch(sync)

        ddp._launch = record
        for p in model.parameters():  # runs after DDP's own hook on the same param
            p.register_post_accumulate_grad_hook(lambda _p: now.update(grads=now["grads"] + 1))
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        for i in range(num_micro):
            now.update(micro=i, grads=0)
            with ddp.no_sync() if i < num_micro - 1 else contextlib.nullcontext():
                batch = next(data)
                ddp(batch["tokens"], batch["position_ids"], labels=batch["labels"]).mean().backward()
        now.update(micro="finish", grads=0)
        ddp.finish_grad_sync()
        n_params = sum(1 for _ in model.parameters())
        return events, len(ddp.buckets), n_params, gather_global(model, None, grads=True)
    finally:
        ps.destroy()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_bucket_reductions_start_in_the_last_backward_only(run_dist, overlap):
    (events, n_buckets, n_params, grads0), (_, _, _, grads1) = run_dist(2, _launches, overlap)
    assert n_buckets == 4
    assert [b for _, b, _ in events] == list(range(n_buckets))  # each bucket once, backward order
    if overlap:
        assert {m for m, _, _ in events} == {2}  # during the last micro-batch's backward ...
        assert events[0][2] < n_params - 1  # ... the first one long before that backward ends
        assert all(e[2] < n_params for e in events)
    else:
        assert {m for m, _, _ in events} == {"finish"}
    for name, g in grads0.items():
        torch.testing.assert_close(g, grads1[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert g.abs().sum() > 0 or "position_embeddings" in name

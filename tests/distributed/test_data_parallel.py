"""Data parallelism equals one process with the same global batch: loss curve, grad norm and
every parameter after a few optimizer steps, for DP = 1, 2, 4 and DP=2 x TP=2, with plain
DDP, overlapped bucketed reduction, the distributed optimizer and overlapped param gathers."""
import pytest
import torch

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.init import gather_global
from megatron_lite.optimizer.core import OptimizerConfig
from megatron_lite.optimizer.distributed import DistributedOptimizer
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer
from megatron_lite.training.train_step import train_step
from tests.model_utils import build, tiny_config

GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS = 8, 1, 16, 3
BUCKET = 20_000  # elements: the tiny GPT (~110k params) splits into several buckets

VARIANTS = {
    "plain": {},
    "overlap": dict(overlap_grad_reduce=True, bucket_size=BUCKET),
    "distopt": dict(use_distributed_optimizer=True),
    "distopt-overlap": dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                            overlap_param_gather=True, bucket_size=BUCKET),
}


def micro_batches(vocab: int, dp_rank: int, dp_size: int, seed: int = 7):
    """Sample k: a run of consecutive ids from a start drawn from (seed, k), learnable and
    independent of the layout; micro-step j of `MICRO_BATCH * DP` samples gives DP rank r its
    slots `[r*b, (r+1)*b)` (spec §2.11), so a global batch is the same samples for any DP."""
    k = 0
    while True:
        ids = [k + dp_rank * MICRO_BATCH + i for i in range(MICRO_BATCH)]
        starts = [int(torch.randint(vocab, (1,), generator=torch.Generator().manual_seed(seed * 100_003 + i)))
                  for i in ids]
        text = torch.stack([(s + torch.arange(SEQ + 1)) % vocab for s in starts])  # [b, s+1]
        yield {"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": torch.ones(len(ids), SEQ),
               "position_ids": torch.arange(SEQ).expand(len(ids), SEQ)}
        k += MICRO_BATCH * dp_size


def train(ps, ddp_kw: dict, model_kw: dict | None = None, opt_kw: dict | None = None, steps: int = STEPS):
    """`steps` optimizer steps on mock data; returns (losses, grad norms, global params)."""
    cfg = tiny_config("gpt", sequence_parallel=ps.tp_size > 1, **(model_kw or {}))
    model = build(cfg, ps)
    ddp = DistributedDataParallel(model, ps, DDPConfig(**ddp_kw))
    ocfg = OptimizerConfig(lr=1e-3, clip_grad=1.0, **(opt_kw or {}))
    if ddp_kw.get("use_distributed_optimizer"):
        opt = DistributedOptimizer([ddp], ocfg, ps)
    else:
        opt = MixedPrecisionOptimizer(model.named_parameters(), ocfg, ps)
    data = micro_batches(cfg.vocab_size, ps.dp_rank, ps.dp_size)
    num_micro = GLOBAL_BATCH // (MICRO_BATCH * ps.dp_size)
    losses, norms = [], []
    for _ in range(steps):
        r = train_step(ddp, opt, data, num_micro, ps, torch.device("cpu"))
        losses.append((r.loss_sum_count[0] / r.loss_sum_count[1]).item())
        norms.append(r.grad_norm.item())
    ddp.finish_param_sync()
    return losses, norms, gather_global(model, ps.tp_group)


def _run_variants(rank, world, tp, names):
    ps = ParallelState.create(tp=tp)
    try:
        return {name: train(ps, VARIANTS[name]) for name in names}
    finally:
        ps.destroy()


_REFERENCE = {}


def _reference():
    if "ref" not in _REFERENCE:
        _REFERENCE["ref"] = _run_variants(0, 1, 1, ["plain"])["plain"]
    return _REFERENCE["ref"]


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

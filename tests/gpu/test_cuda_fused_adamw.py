"""optimizer/fused_adamw.py compiled on CUDA against torch's own path (clip multiply, AdamW
with fused=True, copy into the model params): two MixedPrecisionOptimizers over the same bf16
params (and an fp32 one, its own main) hold the same fp32 mains, moments, step counts and bf16
params after 3 clipped steps, with the same state_dict format; a run switches from the fused
pass to torch's step on the same state; and a param past 2^31 elements is updated at both ends."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.optimizer import fused_adamw
from megatron_lite.optimizer.core import OptimizerConfig
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CFG = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)  # the grads' norm is ~1e3: clipped


def _named_params():
    g = torch.Generator(device="cuda").manual_seed(0)
    # [1000, 3001]: not a block multiple; [64, 64]: one block exactly; 1-D: not decayed
    shapes = {"fc.weight": (1000, 3001), "fc.bias": (1000,), "out.weight": (64, 64)}
    named = [(n, torch.randn(s, device="cuda", generator=g).bfloat16()) for n, s in shapes.items()]
    named.append(("norm.weight", torch.rand(3001, device="cuda", generator=g)))  # fp32: no copy
    return [(n, torch.nn.Parameter(p)) for n, p in named]


def _optimizer(monkeypatch, fused: bool):
    named = _named_params()
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(fused_adamw, "available", lambda inner, copies: False)
        opt = MixedPrecisionOptimizer(named, CFG, ParallelState.create())
    return opt, [p for _, p in named]


def _step(opt, params, step: int):
    g = torch.Generator(device="cuda").manual_seed(100 + step)
    for group in opt.param_groups:  # as the LR/WD scheduler does
        group["lr"] = CFG.lr * (step + 1) / 3
    for p in params:
        p.main_grad = torch.randn(p.shape, device="cuda", generator=g)
    return opt.step()


def _assert_same(fused, ref, fused_params, ref_params):
    # Bitwise equal on an H200 with torch 2.11 (fused_adamw.py follows ATen's fp32 arithmetic
    # operation for operation); the tolerances leave room for another torch's kernel.
    for a, b in zip(fused.main_params, ref.main_params):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
        sa, sb = fused.inner.state[a], ref.inner.state[b]
        assert list(sa) == list(sb) == ["step", "exp_avg", "exp_avg_sq"]
        assert torch.equal(sa["step"], sb["step"])
        assert sa["step"].dtype == torch.float32 and sa["step"].is_cuda and sa["step"].dim() == 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert (sa[key] - sb[key]).abs().max() <= 1e-6 * sb[key].abs().max(), key
    for a, b in zip(fused_params, ref_params):
        # bf16: equal, or one ulp apart where the fp32 mains straddle a rounding boundary
        assert ((a.float() - b.float()).abs() <= b.float().abs() * 2.0 ** -7).all()
        assert (a != b).float().mean() < 1e-3


def test_fused_pass_matches_torch_adamw_clip_and_copy(monkeypatch):
    calls = []
    real = fused_adamw.adamw_step_
    monkeypatch.setattr(fused_adamw, "adamw_step_", lambda *a: calls.append(1) or real(*a))
    (fused, fused_params), (ref, ref_params) = _optimizer(monkeypatch, True), _optimizer(monkeypatch, False)
    for step in range(3):
        norms = _step(fused, fused_params, step).grad_norm, _step(ref, ref_params, step).grad_norm
        assert torch.equal(*norms) and norms[0] > CFG.clip_grad
    assert len(calls) == 3  # the fused pass really ran, and only for `fused`
    _assert_same(fused, ref, fused_params, ref_params)
    a, b = fused.inner.state_dict(), ref.inner.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, st in b["state"].items():
        assert {k: (v.dtype, v.shape, v.device) for k, v in a["state"][i].items()} == \
               {k: (v.dtype, v.shape, v.device) for k, v in st.items()}


def test_run_switches_from_the_fused_pass_to_torch_step(monkeypatch):
    (fused, fused_params), (ref, ref_params) = _optimizer(monkeypatch, True), _optimizer(monkeypatch, False)
    for step in range(3):
        if step == 2:  # e.g. a tensor LR: torch's step continues on the fused pass's state
            monkeypatch.setattr(fused_adamw, "supported", lambda group: False)
        _step(fused, fused_params, step)
        _step(ref, ref_params, step)
    _assert_same(fused, ref, fused_params, ref_params)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 60e9,
                    reason="needs ~45 GB of GPU memory")
def test_param_past_int32_offsets_is_updated_at_both_ends():
    n, k = 2 ** 31 + 4096 + 5, 10_000  # the last program's offsets are past 2^31
    param = torch.zeros(n, device="cuda")
    param.grad = torch.zeros(n, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    ends = [slice(0, k), slice(n - k, n)]
    for s in ends:
        param.data[s] = torch.randn(k, device="cuda", generator=g)
        param.grad[s] = torch.randn(k, device="cuda", generator=g)
    refs = [torch.nn.Parameter(param.data[s].clone()) for s in ends]
    for r, s in zip(refs, ends):
        r.grad = param.grad[s] * 0.5
    fused_adamw.adamw_step_(torch.optim.AdamW([param], lr=1e-2), torch.tensor(0.5, device="cuda"), {})
    torch.optim.AdamW(refs, lr=1e-2, fused=True).step()
    for r, s in zip(refs, ends):
        assert (param.data[s] - r).abs().max() <= 1e-6 * r.abs().max()


def _distributed(monkeypatch, fused: bool):
    """A DistributedOptimizer (DP 1, small buckets: a param per shard piece, views at unaligned
    offsets of the bf16 param buffer) over a tiny bf16 GPT on the GPU."""
    from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
    from megatron_lite.optimizer.distributed import DistributedOptimizer
    from tests.model_utils import build, tiny_config

    ps = ParallelState.create()
    model = build(tiny_config("gpt", params_dtype=torch.bfloat16), ps, device="cuda")
    ddp = DistributedDataParallel(model, ps, DDPConfig(use_distributed_optimizer=True, bucket_size=3000))
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(fused_adamw, "available", lambda inner, copies: False)
        return ddp, DistributedOptimizer([ddp], CFG, ps)


def test_distributed_optimizer_fused_pass_matches_torch_adamw(monkeypatch):
    """The fused pass writes each shard piece's slice of the bf16 param buffer in place of the
    per-shard copy: same mains, moments and buffers as torch's step after 3 clipped steps."""
    (ddp, fused), (ref_ddp, ref) = _distributed(monkeypatch, True), _distributed(monkeypatch, False)
    assert fused._low_by_main is not None and ref._low_by_main is None
    for step in range(3):
        for d in (ddp, ref_ddp):
            g = torch.Generator(device="cuda").manual_seed(100 + step)
            for buf in d.param_buffers:
                buf.grad_data.copy_(torch.randn(buf.grad_data.shape, device="cuda", generator=g) * 1e3)
        assert torch.equal(fused.step().grad_norm, ref.step().grad_norm)
    for a, b in zip(fused.shards, ref.shards):
        assert (a.main - b.main).abs().max() <= 1e-6 * b.main.abs().max()
    for a, b in zip(ddp.param_buffers, ref_ddp.param_buffers):
        x, y = a.param_data.float(), b.param_data.float()
        assert ((x - y).abs() <= y.abs() * 2.0 ** -7).all()
        assert (x != y).float().mean() < 1e-3

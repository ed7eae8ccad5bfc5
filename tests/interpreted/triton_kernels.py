"""Runs megatron_lite's Triton kernels on CPU tensors under Triton's interpreter and prints, as
one JSON object, each case's largest error relative to its fp64 PyTorch reference (outputs and
every gradient). Run by tests/unit/test_triton_interpreted.py in a process of its own, since
TRITON_INTERPRET must be set before Triton is imported."""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel  # noqa: E402
from megatron_lite.distributed.parallel_state import ParallelState  # noqa: E402
from megatron_lite.fused import layernorm, norm_grads, rmsnorm, rope_qkv  # noqa: E402
from megatron_lite.fused.cross_entropy import _FusedCrossEntropy  # noqa: E402
from megatron_lite.fused.elementwise import _rms_norm_reference, _swiglu_reference  # noqa: E402
from megatron_lite.fused.layernorm import _AddLayerNorm, _LayerNorm, _LayerNormKeep  # noqa: E402
from megatron_lite.fused.rmsnorm import _AddRMSNorm, _RMSNorm, _RMSNormKeep  # noqa: E402
from megatron_lite.fused.swiglu import _SwiGLU  # noqa: E402
from megatron_lite.models import attention, norms  # noqa: E402
from megatron_lite.models.rope import apply_rotary, inverse_frequencies, rotary_cos_sin  # noqa: E402
from megatron_lite.optimizer import fused_adamw  # noqa: E402
from megatron_lite.optimizer.clip_grads import clip_coefficient  # noqa: E402
from megatron_lite.optimizer.core import OptimizerConfig  # noqa: E402
from megatron_lite.optimizer.distributed import DistributedOptimizer  # noqa: E402
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer  # noqa: E402
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from tests.model_utils import build, tiny_batch, tiny_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _forward_backward(fn, *inputs):
    """(output, input gradients) for an output gradient drawn the same way in any dtype."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def _forward_backward_pair(fn, *inputs):
    """As _forward_backward for a function of two outputs, each given a gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.dtype)
             for i, o in enumerate(outs, 1)]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _add_norm_cases(name, dtype, g):
    """The fused residual add + norm against `residual + h` and the fp64 reference norm."""
    for shape in [(7, 3, 100), (40, 64)]:
        h, res = ((torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype) for _ in range(2))
        w = (torch.rand(shape[-1], generator=g) * 2).to(dtype)
        b = torch.randn(shape[-1], generator=g).to(dtype)
        yield (f"addrmsnorm {name} {shape}",
               _forward_backward_pair(lambda x, r, c: _AddRMSNorm.apply(x, r, c, 1e-5), h, res, w),
               _forward_backward_pair(lambda x, r, c: (r + x, _rms_norm_reference(r + x, c, 1e-5)),
                                      h.double(), res.double(), w.double()))
        yield (f"addlayernorm {name} {shape}",
               _forward_backward_pair(lambda x, r, c, d: _AddLayerNorm.apply(x, r, c, d, 1e-5), h, res, w, b),
               _forward_backward_pair(lambda x, r, c, d: (r + x, F.layer_norm(r + x, x.shape[-1:], c, d,
                                                                                1e-5)),
                                      h.double(), res.double(), w.double(), b.double()))


def _keep_norm_cases(name, dtype, g):
    """The norm whose input is also the residual: (x, norm(x)), both given gradients."""
    for shape in [(7, 3, 100), (40, 64)]:
        x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
        w = (torch.rand(shape[-1], generator=g) * 2).to(dtype)
        b = torch.randn(shape[-1], generator=g).to(dtype)
        yield (f"keeprmsnorm {name} {shape}",
               _forward_backward_pair(lambda a, c: _RMSNormKeep.apply(a * 1, c, 1e-5), x, w),
               _forward_backward_pair(lambda a, c: (a, _rms_norm_reference(a, c, 1e-5)),
                                      x.double(), w.double()))
        yield (f"keeplayernorm {name} {shape}",
               _forward_backward_pair(lambda a, c, d: _LayerNormKeep.apply(a * 1, c, d, 1e-5), x, w, b),
               _forward_backward_pair(lambda a, c, d: (a, F.layer_norm(a, a.shape[-1:], c, d, 1e-5)),
                                      x.double(), w.double(), b.double()))


def _model_loss_and_grads(family: str, add_norm: bool):
    """A tiny model's loss and gradients on the CPU with the Triton norms (interpreted) and, with
    `add_norm`, the layers' residual adds and gradients fused into them (models/norms.py)."""
    original = norms.Norm.add_and_norm, norms.Norm.keep_and_norm
    if not add_norm:
        norms.Norm.add_and_norm = lambda self, h, residual: None
        norms.Norm.keep_and_norm = lambda self, x: None
    try:
        cfg = tiny_config(family)
        model = build(cfg, ParallelState.create())
        tokens, labels = tiny_batch(cfg)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        return [loss.detach()] + [p.grad for _, p in sorted(model.named_parameters())]
    finally:
        norms.Norm.add_and_norm, norms.Norm.keep_and_norm = original


def _norm_grad_cases(g):
    """fused/norm_grads.py's row sums of backward partials: into an fp32 main_grad (twice, so
    it really accumulates; the placeholder flag set) and as a bf16 gradient."""
    for rows, n in [(37, 100), (512, 2048)]:  # neither a multiple of the blocks, and Llama-1B's
        partial = torch.randn(rows, n, generator=g)
        start = torch.randn(n, generator=g)
        param = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        param.main_grad, param.grad_added_to_main_grad = start.clone(), False
        for _ in range(2):
            placeholder = norm_grads.sum_partials(partial, param, param)
        flag = torch.tensor(float(param.grad_added_to_main_grad and placeholder.shape == param.shape))
        yield (f"normgrad fp32 main_grad {(rows, n)}", [param.main_grad, flag],
               [start.double() + 2 * partial.double().sum(0), torch.tensor(1.0)])
        out = norm_grads.sum_partials(partial, param, None)
        yield f"normgrad bf16 grad {(rows, n)}", [out], [partial.double().sum(0)]


def _rope_qkv_reference(qkv, cos, sin, per):
    """models/attention.py's split and rotation of q and k as views."""
    s, b, groups, width = qkv.shape
    d = width // (per + 2)
    q, k, v = qkv.split([per * d, d, d], dim=-1)
    q = apply_rotary(q.reshape(s, b, groups, per, d), cos.unsqueeze(2), sin.unsqueeze(2))
    return q.reshape(s, b, groups * per, d), apply_rotary(k, cos, sin), v


def _rope_qkv_cases(name, dtype, g):
    """fused/rope_qkv.py's q, k, v and QKV gradient: GQA groups of 3 query heads (a head tile
    past the row), MHA (one per group), 4 per group over a wide head."""
    for s, b, groups, per, d in [(5, 2, 3, 3, 16), (4, 1, 2, 1, 8), (3, 2, 1, 4, 32)]:
        qkv = torch.randn(s, b, groups, (per + 2) * d, generator=g).to(dtype)
        cos, sin = rotary_cos_sin(torch.arange(s).repeat(b, 1) + 3, inverse_frequencies(d, 10000.0),
                                  dtype=dtype)
        yield (f"ropeqkv {name} {(s, b, groups, per, d)}",
               _forward_backward_outputs(lambda x, c=cos, t=sin, n=per: rope_qkv._RopeQKV.apply(x, c, t, n),
                                         qkv),
               _forward_backward_outputs(lambda x, c=cos, t=sin, n=per:
                                         _rope_qkv_reference(x, c.double(), t.double(), n), qkv.double()))


def _forward_backward_outputs(fn, x):
    """Outputs of `fn(x)` (several) and x's gradient, each output given its own gradient."""
    x = x.detach().clone().requires_grad_(True)
    outs = fn(x)
    grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.dtype)
             for i, o in enumerate(outs, 1)]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs] + [x.grad]


def _rope_model_loss_and_grads(fused: bool):
    """The tiny Llama's loss and gradients with its RoPE by fused/rope_qkv.py (the CUDA check
    patched; first the number of kernel calls, forward and backward) or by the rotation."""
    calls, real = [], rope_qkv._RopeQKV.apply
    originals = attention.rope_qkv_available, rope_qkv.available, rope_qkv._RopeQKV.apply
    cpu_ok = lambda qkv, cos, per, interleaved: fused and not interleaved  # noqa: E731
    attention.rope_qkv_available = rope_qkv.available = cpu_ok
    rope_qkv._RopeQKV.apply = lambda *a: calls.append(1) or real(*a)
    try:
        cfg = tiny_config("llama")
        model = build(cfg, ParallelState.create())
        tokens, labels = tiny_batch(cfg)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        return [torch.tensor(float(len(calls) if fused else cfg.num_layers)), loss.detach()] + [
            p.grad for _, p in sorted(model.named_parameters())]
    finally:
        attention.rope_qkv_available, rope_qkv.available, rope_qkv._RopeQKV.apply = originals


def _fp32(x: float) -> float:
    """`x` rounded to fp32, as ATen's fused AdamW rounds its hyper-parameters."""
    return torch.tensor(x, dtype=torch.float32).item()


def _adamw_cases(g):
    """optimizer/fused_adamw.py's pass against torch's AdamW in fp64 on the same clipped grads:
    3 steps (the LR changing, as the scheduler changes it) over a decayed [3, 1500] param (not a
    block multiple, with a bf16 model copy) and an undecayed [100] one (no copy); the clip
    coefficient (about 0.4) applied inside the pass. The reference's hyper-parameters are
    rounded to fp32 as ATen's fused AdamW (and this pass) rounds them: 1 - 0.999 is 1.3e-5 off
    in fp32, which the moments would show."""
    params = [torch.randn(3, 1500, generator=g), torch.randn(100, generator=g)]
    fused = [torch.nn.Parameter(p.clone()) for p in params]
    ref = [torch.nn.Parameter(p.double()) for p in params]
    copy = params[0].bfloat16()
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
    opt = torch.optim.AdamW(groups(fused), lr=1e-2)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(_fp32(0.9), _fp32(0.999)), eps=_fp32(1e-8),
                                foreach=False)
    for group in ref_opt.param_groups:
        group["weight_decay"] = _fp32(group["weight_decay"])
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        norm = torch.stack([x.norm() for x in grads]).norm()
        coeff = clip_coefficient(norm, 0.4 * norm.item())
        for group, ref_group in zip(opt.param_groups, ref_opt.param_groups):
            group["lr"], ref_group["lr"] = 1e-2 / (step + 1), _fp32(1e-2 / (step + 1))
        for p, r, grad in zip(fused, ref, grads):
            p.grad, r.grad = grad.clone(), grad.double() * coeff.double()
        fused_adamw.adamw_step_(opt, coeff, {fused[0]: copy})
        ref_opt.step()
    state = lambda o, ps, key: [o.state[p][key] for p in ps]  # noqa: E731
    yield "adamw fp32 params", list(fused), list(ref)
    yield ("adamw fp32 moments", state(opt, fused, "exp_avg") + state(opt, fused, "exp_avg_sq"),
           state(ref_opt, ref, "exp_avg") + state(ref_opt, ref, "exp_avg_sq"))
    yield "adamw fp32 steps", state(opt, fused, "step"), state(ref_opt, ref, "step")
    # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): within one bf16 ulp.
    yield "adamw bf16 model copy", [copy], [ref[0]]


def _adamw_model_case(fused: bool):
    """A MixedPrecisionOptimizer over bf16 params (and one fp32 param, its own main) after 3
    clipped steps, with the fused pass (the CUDA check patched) or torch's AdamW + clip multiply
    + copy: the fp32 mains and moments, and the bf16 params."""
    g = torch.Generator().manual_seed(2)
    named = [("fc.weight", torch.randn(64, 80, generator=g).bfloat16()),
             ("fc.bias", torch.randn(64, generator=g).bfloat16()),
             ("norm.weight", torch.rand(80, generator=g))]  # fp32: its own main, no copy
    named = [(n, torch.nn.Parameter(p)) for n, p in named]
    original = fused_adamw.available
    fused_adamw.available = lambda inner, copies: fused and type(inner) is torch.optim.AdamW
    try:
        # Betas exact in fp32: torch's CPU AdamW takes 1 - beta2 from the double, the fused pass
        # (as ATen's CUDA kernel) from the fp32 beta2, 1.3e-5 apart for 0.999.
        cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5, adam_beta1=_fp32(0.9),
                              adam_beta2=_fp32(0.999))
        opt = MixedPrecisionOptimizer(named, cfg, ParallelState.create())
    finally:
        fused_adamw.available = original
    for _ in range(3):
        for _, p in named:
            p.main_grad = torch.randn(p.shape, generator=g)
        opt.step()
    mains = opt.main_params
    return ([*mains, *(opt.inner.state[m][k] for m in mains for k in ("exp_avg", "exp_avg_sq"))],
            [p.detach() for _, p in named])


def _adamw_distributed_case(fused: bool):
    """A DistributedOptimizer (DP 1, small buckets: 9 shards) over a tiny bf16 GPT after 3
    clipped steps on seeded buffer grads, with the fused pass (the CUDA check patched) writing
    each shard piece's slice of the bf16 param buffer, or with torch's step and the per-shard
    copy: first whether the pass was chosen, then the fp32 mains, then the param buffers."""
    cfg, ps = tiny_config("gpt", params_dtype=torch.bfloat16), ParallelState.create()
    ddp = DistributedDataParallel(build(cfg, ps), ps, DDPConfig(use_distributed_optimizer=True,
                                                                bucket_size=3000))
    original = fused_adamw.available
    fused_adamw.available = lambda inner, copies: fused and type(inner) is torch.optim.AdamW
    try:
        opt = DistributedOptimizer([ddp], OptimizerConfig(lr=1e-2, clip_grad=0.5, weight_decay=0.1), ps)
    finally:
        fused_adamw.available = original
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        for buf in ddp.param_buffers:
            buf.grad_data.copy_(torch.randn(buf.grad_data.shape, generator=g))
        opt.step()
    chosen = torch.tensor(float(opt._low_by_main is not None))
    return [chosen] + [s.main for s in opt.shards], [b.param_data for b in ddp.param_buffers]


def _model_main_grads(family: str, fused: bool):
    """A tiny model's fp32 main_grads after two micro-batches under DDP, the norms' gamma and
    beta gradients summed into them by fused/norm_grads.py or (not `fused`) by autograd; first
    the number of row sums that went into a main_grad (fused) or of all row sums (not)."""
    original, real_sum = norms.Norm.grad_params, norm_grads.sum_partials
    into_main_grad = []  # the fused calls, counted: the comparison means nothing without them
    if not fused:
        norms.Norm.grad_params = lambda self: None
    norm_grads.sum_partials = lambda partial, like, param: (
        into_main_grad.append(param is not None) or real_sum(partial, like, param))
    try:
        cfg = tiny_config(family)
        model = build(cfg, ParallelState.create())
        ddp = DistributedDataParallel(model, ParallelState.create(), DDPConfig())
        for i in range(2):
            tokens, labels = tiny_batch(cfg, seed=i)
            ddp.enable_grad_sync(i == 1)
            model(tokens, labels=labels).mean().backward()
        ddp.finish_grad_sync()
        fused_calls = torch.tensor(float(sum(into_main_grad) if fused else len(into_main_grad)))
        return [fused_calls] + [p.main_grad.clone() for _, p in sorted(model.named_parameters())]
    finally:
        norms.Norm.grad_params, norm_grads.sum_partials = original, real_sum


def _model_cases():
    """GPT and Llama layers with the fused residual add against the same layers without it."""
    cpu_ok = lambda x, w, b=None: x.dtype == w.dtype  # noqa: E731 - the kernels run interpreted
    for module in (layernorm, rmsnorm, norms):
        for attr in ("available", "layer_norm_kernel_available", "rms_norm_kernel_available"):
            if hasattr(module, attr):
                setattr(module, attr, cpu_ok)
    for family in ("gpt", "llama"):
        yield (f"addnorm-model fp32 {family}", _model_loss_and_grads(family, True),
               _model_loss_and_grads(family, False))
        yield (f"normgrad-model fp32 {family}", _model_main_grads(family, True),
               _model_main_grads(family, False))
    yield "ropeqkv-model fp32 llama", _rope_model_loss_and_grads(True), _rope_model_loss_and_grads(False)
    (mains, params), (ref_mains, ref_params) = _adamw_model_case(True), _adamw_model_case(False)
    yield "adamw-model fp32 mains and moments", mains, ref_mains
    # bf16 params: the interpreter truncates where torch's copy rounds, one bf16 ulp apart.
    yield "adamw-model bf16 params", params, ref_params
    (mains, buffers), (ref_mains, ref_buffers) = _adamw_distributed_case(True), _adamw_distributed_case(False)
    yield "adamw-distributed fp32 mains", mains, [torch.tensor(1.0)] + ref_mains[1:]
    yield "adamw-distributed bf16 param buffers", buffers, ref_buffers


def _relative_errors(got, want) -> float:
    return max(((g.double() - w.double()).abs().max() / w.double().abs().max().clamp(min=1e-30)).item()
               for g, w in zip(got, want))


def _cases():
    g = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        for shape in [(6, 2, 2 * 100), (3, 2 * 1030)]:
            h = (torch.randn(*shape, generator=g) * 3).to(dtype)
            yield (f"swiglu {name} {shape}", _forward_backward(_SwiGLU.apply, h),
                   _forward_backward(_swiglu_reference, h.double()))
        for shape in [(7, 3, 100), (5, 2048), (40, 64)]:  # rows above and below a program's 16
            x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
            w = (torch.rand(shape[-1], generator=g) * 2).to(dtype)
            yield (f"rmsnorm {name} {shape}",
                   _forward_backward(lambda a, b: _RMSNorm.apply(a, b, 1e-5), x, w),
                   _forward_backward(lambda a, b: _rms_norm_reference(a, b, 1e-5), x.double(), w.double()))
            b = torch.randn(shape[-1], generator=g).to(dtype)
            yield (f"layernorm {name} {shape}",
                   _forward_backward(lambda a, c, d: _LayerNorm.apply(a, c, d, 1e-5), x, w, b),
                   _forward_backward(lambda a, c, d: F.layer_norm(a, a.shape[-1:], c, d, 1e-5),
                                     x.double(), w.double(), b.double()))
        yield from _add_norm_cases(name, dtype, g)
        yield from _keep_norm_cases(name, dtype, g)
        yield from _rope_qkv_cases(name, dtype, g)
        for smoothing in (0.0, 0.1):
            logits = (torch.randn(9, 2, 5003, generator=g) * 3).to(dtype)  # V not a block multiple
            target = torch.randint(0, 5003, (9, 2), generator=g)
            fused = lambda x, t=target, s=smoothing: _FusedCrossEntropy.apply(x, t, None, s)  # noqa: E731
            ref = lambda x, t=target, s=smoothing: vocab_parallel_cross_entropy(x, t, None, s)  # noqa: E731
            yield (f"cross_entropy {name} smoothing {smoothing}", _forward_backward(fused, logits),
                   _forward_backward(ref, logits.double()))
    yield from _norm_grad_cases(g)
    yield from _adamw_cases(g)


def main() -> None:
    cases = [*_cases(), *_model_cases()]  # the model cases patch the kernels' CUDA checks: last
    print(json.dumps({name: _relative_errors(got, want) for name, got, want in cases}))


if __name__ == "__main__":
    main()

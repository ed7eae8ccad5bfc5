"""Fused CUDA ops against their PyTorch references (DESIGN rule 6)."""
import pytest
import torch

from megatron_lite.fused import norm_grads
from megatron_lite.fused.cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_lite.fused.elementwise import rms_norm, rotary, swiglu
from megatron_lite.fused.rope_qkv import available as rope_qkv_available
from megatron_lite.fused.rope_qkv import rope_qkv
from megatron_lite.models.rope import inverse_frequencies, rotary_cos_sin
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

pytestmark = pytest.mark.gpu


def _fwd_bwd(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.ones_like(out) * 0.37)
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


def _close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_elementwise_match_reference(dtype, tol):
    torch.manual_seed(0)
    h = torch.randn(64, 2, 256, device="cuda", dtype=dtype)
    out, grads = _fwd_bwd(swiglu, h)
    ref, ref_grads = _fwd_bwd(swiglu.reference, h)
    _close(out, ref, tol)
    _close(grads[0], ref_grads[0], tol)

    x = torch.randn(64, 2, 128, device="cuda", dtype=dtype)
    w = torch.rand(128, device="cuda", dtype=dtype)
    out, grads = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-5), x, w)
    ref, ref_grads = _fwd_bwd(lambda a, b: rms_norm.reference(a, b, 1e-5), x, w)
    _close(out, ref, tol)
    for g, r in zip(grads, ref_grads):
        _close(g, r, tol * 4)

    q = torch.randn(64, 2, 4, 32, device="cuda", dtype=dtype)
    pos = torch.arange(64, device="cuda").expand(2, 64)
    cos, sin = rotary_cos_sin(pos, inverse_frequencies(32, 10000.0).cuda(), dtype=dtype)
    out, grads = _fwd_bwd(lambda t: rotary(t, cos, sin, False), q)
    ref, ref_grads = _fwd_bwd(lambda t: rotary.reference(t, cos, sin, False), q)
    _close(out, ref, tol)
    _close(grads[0], ref_grads[0], tol)


def _rope_qkv_reference(qkv, cos, sin, per):
    """models/attention.py's split and rotation of q and k as views, by the eager reference in
    fp32 (one rounding per output, as the kernels; the compiled `rotary` would recompile per
    shape past torch.compile's limit across these cases)."""
    s, b, groups, width = qkv.shape
    d = width // (per + 2)
    q, k, v = qkv.split([per * d, d, d], dim=-1)
    cos, sin = cos.float(), sin.float()
    q = rotary.reference(q.view(s, b, groups, per, d), cos.unsqueeze(2), sin.unsqueeze(2), False)
    return q.reshape(s, b, groups * per, d), rotary.reference(k, cos, sin, False), v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("groups,per,d", [(8, 4, 64), (16, 1, 128), (3, 3, 64), (4, 4, 128)])
def test_rope_on_qkv_matches_the_compiled_rotation(dtype, tol, groups, per, d):
    """fused/rope_qkv.py: q, k, v and the whole QKV gradient (a gradient per output)."""
    torch.manual_seed(0)
    s, b = 96, 2
    qkv = torch.randn(s, b, groups, (per + 2) * d, device="cuda", dtype=dtype)
    pos = torch.arange(s, device="cuda").expand(b, s) + 5
    cos, sin = rotary_cos_sin(pos, inverse_frequencies(d, 500000.0).cuda(), dtype=dtype)
    assert rope_qkv_available(qkv, cos, per, False) and not rope_qkv_available(qkv, cos, per, True)
    results = []
    for fn, x in ((rope_qkv, qkv), (_rope_qkv_reference, qkv.float())):
        x = x.detach().clone().requires_grad_()
        outs = fn(x, cos, sin, per)
        grads = [torch.randn(o.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
                 .to(dtype).to(o.dtype) for i, o in enumerate(outs)]
        torch.autograd.backward(outs, grads)
        results.append([o.detach().to(dtype) for o in outs] + [x.grad.to(dtype)])
    assert [t.shape for t in results[0]] == [t.shape for t in results[1]]
    for got, want in zip(*results):
        _close(got, want, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_cross_entropy_matches_reference(dtype, smoothing):
    torch.manual_seed(0)
    logits = (torch.randn(37, 3, 5003, device="cuda") * 3).to(dtype)  # V not a block multiple
    target = torch.randint(0, 5003, (37, 3), device="cuda")
    out, (grad,) = _fwd_bwd(lambda x: fused_vocab_parallel_cross_entropy(x, target, None, smoothing), logits)
    ref, (ref_grad,) = _fwd_bwd(lambda x: vocab_parallel_cross_entropy(x, target, None, smoothing), logits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)
    assert grad.dtype == dtype


def test_cpu_initialization_gives_the_cpu_runs_weights():
    """--use-cpu-initialization: a model on the GPU starts from exactly the CPU run's weights."""
    from megatron_lite.distributed.parallel_state import ParallelState
    from megatron_lite.models.gpt import GPTModel
    from megatron_lite.models.init import init_model_parameters
    from tests.model_utils import tiny_config

    cfg, ps = tiny_config("llama"), ParallelState.create()
    models = {}
    for device, cpu_init in (("cpu", False), ("cuda", True), ("cuda", False)):
        model = GPTModel(cfg, ps, device=device)
        init_model_parameters(model, 1234, cfg.init_method_std, cfg.num_layers, 0, 1, cpu_init=cpu_init)
        models[(device, cpu_init)] = dict(model.named_parameters())
    cpu, gpu_cpu_init, gpu = models[("cpu", False)], models[("cuda", True)], models[("cuda", False)]
    for name, param in cpu.items():
        assert torch.equal(gpu_cpu_init[name].cpu(), param), name
    assert any(not torch.equal(gpu[n].cpu(), p) for n, p in cpu.items() if "layernorm" not in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 2, 2 * 1000), (3, 5, 2 * 4096), (17, 2 * 2048)])
def test_triton_swiglu_matches_fp32_reference(dtype, shape):
    """The kernels compute in fp32 and round once per output: against the fp32 reference they
    agree to fp32 rounding, or to one bf16 rounding step (`f` not a block multiple included)."""
    torch.manual_seed(0)
    h = (torch.randn(*shape, device="cuda") * 3).to(dtype)
    out, (grad,) = _fwd_bwd(swiglu, h)
    ref, (ref_grad,) = _fwd_bwd(swiglu.reference, h.float())
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert out.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=tol, atol=tol)


def test_triton_swiglu_takes_strided_gradients():
    """A non-contiguous output gradient (e.g. from a transposing consumer) gives the same grads."""
    torch.manual_seed(0)
    h = torch.randn(8, 4, 2 * 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 8, 256, device="cuda", dtype=torch.bfloat16).transpose(0, 1)  # strided
    swiglu(h).backward(g)
    h_ref = h.detach().float().requires_grad_()
    swiglu.reference(h_ref).backward(g.float())
    torch.testing.assert_close(h.grad.float(), h_ref.grad, rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 2, 2048), (37, 3, 1000), (5, 4096)])
def test_triton_rms_norm_matches_fp32_reference(dtype, shape):
    """Against the reference on the same inputs in fp64 (bf16 values exactly representable):
    the output within one rounding, dx and gamma's gradient (summed over all rows, rows not a
    multiple of a program's 16) within a few; gamma scaled so the rounding of y/gamma matters."""
    from megatron_lite.fused.rmsnorm import available

    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * 2 + 0.5).to(dtype)
    w = (torch.rand(shape[-1], device="cuda") * 2).to(dtype)
    assert available(x, w)
    out, (dx, dw) = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-5), x, w)
    ref, (ref_dx, ref_dw) = _fwd_bwd(lambda a, b: rms_norm.reference(a, b, 1e-5), x.double(), w.double())
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert out.dtype == dx.dtype == dw.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=tol, atol=tol)
    # gamma's gradient sums ~10^4 rows: relative to its scale
    scale = ref_dw.abs().max()
    assert ((dw.double() - ref_dw).abs().max() / scale).item() < tol, (dw, ref_dw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 2, 2048), (37, 3, 1000), (5, 4096)])
def test_triton_layer_norm_matches_fp64_reference(dtype, shape):
    """As the RMSNorm test, against F.layer_norm in fp64: output and dx within one rounding,
    gamma's and beta's gradients (summed over all rows) relative to their scale."""
    from megatron_lite.fused.layernorm import available, triton_layer_norm

    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * 2 + 0.5).to(dtype)
    w = (torch.rand(shape[-1], device="cuda") * 2).to(dtype)
    b = torch.randn(shape[-1], device="cuda").to(dtype)
    assert available(x, w, b)
    out, grads = _fwd_bwd(lambda a, g, c: triton_layer_norm(a, g, c, 1e-5), x, w, b)
    ref, ref_grads = _fwd_bwd(lambda a, g, c: torch.nn.functional.layer_norm(a, a.shape[-1:], g, c, 1e-5),
                              x.double(), w.double(), b.double())
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=tol, atol=tol)
    for g, r in zip(grads[1:], ref_grads[1:]):
        assert ((g.double() - r).abs().max() / r.abs().max()).item() < tol, (g, r)


def test_norm_module_takes_the_triton_layer_norm_unless_unfused():
    from megatron_lite.models.norms import Norm

    torch.manual_seed(0)
    x = torch.randn(16, 2, 256, device="cuda", dtype=torch.bfloat16)
    fused = Norm(256, "LayerNorm", dtype=torch.bfloat16, device="cuda")
    plain = Norm(256, "LayerNorm", dtype=torch.bfloat16, device="cuda", fused=False)
    with torch.no_grad():
        for m in (fused, plain):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        plain.load_state_dict(fused.state_dict())
    y, y_plain = fused(x), plain(x)
    assert type(y.grad_fn).__name__ == "_LayerNormBackward"
    assert type(y_plain.grad_fn).__name__ == "NativeLayerNormBackward0"
    torch.testing.assert_close(y.float(), y_plain.float(), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("fusion", ["add", "keep"])
@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 2, 2048), (37, 3, 1000)])
def test_norm_residual_fusions_match_the_unfused_norm(fusion, kind, dtype, shape):
    """Norm.add_and_norm (residual + h and its norm, one Triton kernel each way) against
    `residual + h` then the unfused norm in fp64, and Norm.keep_and_norm (x and its norm, the
    residual's gradient added in the norm's backward) against x and the unfused norm: the sum
    as the same add rounds it, the normed output within one rounding, the inputs' gradients
    and gamma's (beta's) relative to their scale; both outputs get a gradient, as in a
    transformer layer."""
    from megatron_lite.models.norms import Norm

    torch.manual_seed(0)
    h, res = ((torch.randn(*shape, device="cuda") * 2 + 0.5).to(dtype) for _ in range(2))
    norm = Norm(shape[-1], kind, dtype=dtype, device="cuda")
    plain = Norm(shape[-1], kind, dtype=torch.float64, device="cuda", fused=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if norm.bias is not None:
            norm.bias.uniform_(-0.5, 0.5)
        plain.load_state_dict({k: v.double() for k, v in norm.state_dict().items()})
    g_sum, g_y = (torch.randn(*shape, device="cuda").to(dtype) for _ in range(2))

    def run(module, fused, cast):
        a, r = (t.detach().to(cast).requires_grad_() for t in (h, res))
        if fusion == "add":
            total, y = module.add_and_norm(a, r) if fused else (r + a, module(r + a))
        else:
            total, y = module.keep_and_norm(r) if fused else (r, module(r))
        torch.autograd.backward([total, y], [g_sum.to(cast), g_y.to(cast)])
        grads = [a.grad, r.grad] if fusion == "add" else [r.grad]
        return [total, y] + grads + [p.grad for p in module.parameters()]

    got, want = run(norm, True, dtype), run(plain, False, torch.float64)
    assert type(got[1].grad_fn).__name__.startswith(("_AddRMSNorm", "_AddLayerNorm", "_RMSNormKeep",
                                                     "_LayerNormKeep"))
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    # The same add, rounded once (bf16: within one last place where the rounding mode differs)
    expected = (res + h) if fusion == "add" else res
    torch.testing.assert_close(got[0], expected, rtol=0 if dtype == torch.float32 else 2**-7, atol=0)
    torch.testing.assert_close(got[1].double(), want[1], rtol=tol, atol=tol)
    for g, w in zip(got[2:], want[2:]):
        assert g.dtype == dtype
        assert ((g.double() - w).abs().max() / w.abs().max()).item() < tol, (g, w)


@pytest.mark.parametrize("rows,n", [(512, 2048), (37, 100)])
def test_norm_grad_partials_sum_into_main_grad(rows, n):
    """fused/norm_grads.py: the backward kernels' partial sums added to an fp32 main_grad in
    place (twice: it accumulates), in a fixed order, or returned in gamma's dtype."""
    g = torch.Generator(device="cuda").manual_seed(0)
    partial = torch.randn(rows, n, device="cuda", generator=g)
    start = torch.randn(n, device="cuda", generator=g)
    param = torch.nn.Parameter(torch.ones(n, device="cuda", dtype=torch.bfloat16))
    param.main_grad, param.grad_added_to_main_grad = start.clone(), False
    ptr = param.main_grad.data_ptr()
    for _ in range(2):
        placeholder = norm_grads.sum_partials(partial, param, param)
    assert param.grad_added_to_main_grad and placeholder.shape == param.shape
    assert param.main_grad.data_ptr() == ptr
    exact = start.double() + 2 * partial.double().sum(0)
    # fp32 sums of 2 x 512 N(0, 1) values: a few fp32 ulps of the largest sum (2.7e-7 of it
    # under Triton's interpreter); elementwise, a sum near zero can be off by more relatively
    # (3.9e-6 of one element on an H200).
    err = ((param.main_grad.double() - exact).abs().max() / exact.abs().max()).item()
    assert err < 2e-6, err
    out = norm_grads.sum_partials(partial, param, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), partial.double().sum(0).float(), rtol=8e-3, atol=1e-5)
    again = norm_grads.sum_partials(partial, partial[0], None)
    assert torch.equal(again, norm_grads.sum_partials(partial, partial[0], None))

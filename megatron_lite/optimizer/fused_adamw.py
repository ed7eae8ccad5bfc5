"""The optimizers' clip + AdamW update + main -> model copy (spec §7.3 steps 3, 5 and 6) as one
Triton pass per parameter (or distributed-optimizer shard piece) on CUDA.

Unfused, a Llama-1B step on an H200 spends 2.8 ms multiplying the grads by the clip
coefficient (`torch._foreach_mul_`), 10.4 ms in torch's fused AdamW and 2.1 ms copying the
fp32 mains into the bf16 model params: three passes over memory where one suffices. Here each
program loads a block of param, grad, exp_avg and exp_avg_sq, scales the grad by the clip
coefficient as it loads it, and stores param, exp_avg, exp_avg_sq and the param rounded to the
model's dtype: 9.5 ms for the three's 15.0 (3.9 TB/s), its results bitwise torch's.

The arithmetic is ATen's fused AdamW (`fused_adam_utils.cuh`, ADAMW mode), in fp32, and the
state is torch's own (`state["step"]` a 0-dim fp32 tensor on the param's device, `exp_avg`,
`exp_avg_sq`), so `state_dict()` and checkpoints are unchanged and a run can switch between
this pass and `torch.optim.AdamW.step`. Nothing is read on the host: the step counts are
incremented on the device and the kernel loads its step and clip coefficient from pointers.
"""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs don't have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU machines
    triton = None

# 1024 elements per program over 4 warps (two 16-byte loads per tensor per thread): at the
# Llama-1B sizes on an H200, 9.47 ms (3.9 TB/s counting 30 bytes an element) against 9.9-10.1
# for 2048-4096 elements and 4-16 warps; 512 elements or 8 warps change nothing.
_BLOCK = 1024
_NUM_WARPS = 4

if triton is not None:

    @triton.jit
    def _bias_correction(beta, step):
        # 1 - beta**step as ATen computes it: powf(beta, step) in fp32, then 1 - that in fp32.
        # Early steps cancel (1 - 0.999), so the power's last bit matters: taken here as
        # exp(step * log(beta)) in fp64 and rounded once, it is powf's correctly rounded result
        # (bitwise ATen's on an H200), where fp32 exp2/log2 would be a few ulp off, ~1e-4 after
        # the cancellation. libdevice's pow would do too, but the interpreter lacks it.
        return 1.0 - tl.exp(step.to(tl.float64) * tl.log(tl.cast(beta, tl.float64))).to(tl.float32)

    @triton.jit
    def _adamw_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, model_ptr, coeff_ptr, step_ptr,
                      numel, lr, weight_decay, beta1, beta2, eps, CLIP: tl.constexpr, DECAY: tl.constexpr,
                      COPY: tl.constexpr, BLOCK: tl.constexpr):
        # ATen's fused AdamW (fused_adam_utils.cuh, ADAMW mode) operation for operation, all in
        # fp32 with the hyper-parameters rounded to fp32 as it rounds them.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: tables past 2^31
        mask = offs < numel
        # Already fp32 on the GPU; the interpreter would keep Python floats in double.
        lr, weight_decay = tl.cast(lr, tl.float32), tl.cast(weight_decay, tl.float32)
        beta1, beta2 = tl.cast(beta1, tl.float32), tl.cast(beta2, tl.float32)
        step = tl.load(step_ptr)  # this step's count, already incremented
        bias_correction1 = _bias_correction(beta1, step)
        bias_correction2_sqrt = tl.sqrt_rn(_bias_correction(beta2, step))
        p = tl.load(param_ptr + offs, mask=mask)
        g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
        if CLIP:  # spec §7.4: scaled by max_norm / (norm + 1e-6), at most 1
            g = g * tl.load(coeff_ptr)
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
        if DECAY:  # decoupled weight decay, before the moments: p -= lr * wd * p
            p = tl.fma(-(lr * weight_decay), p, p)
        # ATen's lerp fma(beta, m, fma(-beta, g, g)): for beta >= 0.5, 1 - beta is exact in fp32
        # (Sterbenz), so its inner fma is (1 - beta) * g rounded once, as here; written so, the
        # interpreter, whose fma rounds twice, doesn't cancel g - 0.999 g to 1e-4 relative.
        m = tl.fma(beta1, m, (1.0 - beta1) * g)
        g2 = g * g
        v = tl.fma(beta2, v, (1.0 - beta2) * g2)
        # IEEE division and square root, as ATen's kernel: Triton's plain `/` and tl.sqrt are
        # the approximate PTX instructions.
        step_size = tl.math.div_rn(lr, bias_correction1)
        denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p - tl.math.div_rn(step_size * m, denom)
        tl.store(param_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        if COPY:  # spec §7.3 step 6 in the same pass: fp32 main -> bf16/fp16 model param
            tl.store(model_ptr + offs, p.to(model_ptr.dtype.element_ty), mask=mask)


def available(inner, model_copies: dict[torch.Tensor, torch.Tensor]) -> bool:
    """Whether this pass can replace `inner.step()`: Triton installed, `inner` a plain
    `torch.optim.AdamW` (not the cpu-offload HybridOptimizer, not a subclass with a step of its
    own) whose params are contiguous fp32 CUDA tensors, and `model_copies` (main -> its
    low-precision model param) contiguous CUDA tensors of their mains' sizes. The group options
    can change after construction: `supported` checks them each step."""
    if triton is None or type(inner) is not torch.optim.AdamW:
        return False
    params = [p for group in inner.param_groups for p in group["params"]]
    flat_cuda = lambda t: t.is_cuda and t.is_contiguous()  # noqa: E731 - the kernel indexes flat
    return (all(flat_cuda(p) and p.dtype == torch.float32 for p in params)
            and all(flat_cuda(low) and low.numel() == main.numel() for main, low in model_copies.items()))


def supported(group: dict) -> bool:
    """Whether the kernel implements `group`'s options: AdamW with float lr and betas, and
    none of amsgrad, maximize, differentiable (what ATen's fused kernel does besides)."""
    return (not group["amsgrad"] and not group["maximize"] and not group["differentiable"]
            and not any(torch.is_tensor(x) for x in (group["lr"], *group["betas"])))


def step_for(inner, model_copies: dict[torch.Tensor, torch.Tensor] | None):
    """This step's replacement for the clip multiply, `inner.step()` and the copy into the
    model params (`unscale_clip_and_step`'s `fused_step`), or None where torch's step must run:
    `model_copies` None (`available` said no when the optimizer was built) or a group option
    the kernel lacks. Checked each step: a loaded state dict or a tensor LR can change the
    options, and torch's step then takes over on the same state."""
    if model_copies is None or not all(map(supported, inner.param_groups)):
        return None
    return lambda coeff: adamw_step_(inner, coeff, model_copies)


def _state(inner: torch.optim.AdamW, param: torch.Tensor) -> dict:
    """`param`'s AdamW state, created on first use exactly as torch's fused AdamW does."""
    state = inner.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def adamw_step_(inner: torch.optim.AdamW, coeff: torch.Tensor | None,
                model_copies: dict[torch.Tensor, torch.Tensor]) -> None:
    """`inner.step()` for the params with a `.grad`, each grad first scaled by `coeff` (a 0-dim
    fp32 tensor on the params' device, None: no clipping), and each param in `model_copies`
    also written, rounded, into its low-precision model param. Callers check `available` and
    `supported`; the grads are read, not modified."""
    for group in inner.param_groups:
        if not supported(group):
            raise ValueError("the fused AdamW pass does not implement amsgrad, maximize, "
                             "differentiable or a tensor lr/betas")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [_state(inner, p) for p in params]
        torch._foreach_add_([s["step"] for s in states], 1)  # on the device, as torch's fused step
        # fp32 scalars: the launch rounds them as ATen does. The LR/WD scheduler writes
        # group["lr"] and group["weight_decay"] every step.
        hyper = (group["lr"], group["weight_decay"], *group["betas"], group["eps"])
        for p, state in zip(params, states):
            if p.grad.shape != p.shape or not p.grad.is_contiguous():
                raise ValueError(f"the fused AdamW pass needs a contiguous grad of the param's shape "
                                 f"{tuple(p.shape)}, got {tuple(p.grad.shape)} {p.grad.stride()}")
            model = model_copies.get(p)
            _adamw_kernel[(triton.cdiv(p.numel(), _BLOCK),)](
                p, p.grad, state["exp_avg"], state["exp_avg_sq"], p if model is None else model,
                p if coeff is None else coeff, state["step"], p.numel(), *hyper,
                CLIP=coeff is not None, DECAY=group["weight_decay"] != 0, COPY=model is not None,
                BLOCK=_BLOCK, num_warps=_NUM_WARPS)

"""The optimizer across ranks: the clipping norm is the norm of the dense gradient (TP=2 x DP=2,
no double counting of TP-replicated or tied params); an inf gradient on one rank skips exactly
one iteration on every rank, leaves the parameters alone and is counted in the log line; the
distributed optimizer holds 1/DP of the optimizer memory per rank."""
import io
import re

import pytest
import torch

from megatron_lite.data_parallel.finalize import finalize_grads
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.optimizer.grad_scaler import DynamicLossScaler
from megatron_lite.training.logging import RankLogger
from megatron_lite.training.microbatches import MicroBatchCalculator
from megatron_lite.training.tensorboard import TensorboardConfig, TensorboardLogger
from megatron_lite.training.timers import Timers
from megatron_lite.training.train_loop import LoopConfig, LoopHooks, LoopState, Trainer
from megatron_lite.training.train_step import forward_backward, train_step
from tests.dp_utils import (
    CPU,
    GLOBAL_BATCH,
    MICRO_BATCH,
    SEQ,
    build_trainable,
    micro_batches,
    num_microbatches,
)


def _dense_grad_norm(family):
    """Single process: norm of all gradients of the global batch, concatenated."""
    ps = ParallelState.create()
    model, ddp, _ = build_trainable(ps, {}, family=family)
    data = micro_batches(model.config.vocab_size, 0, 1)
    forward_backward(ddp, data, num_microbatches(ps), ps)
    finalize_grads([ddp], ps)
    return torch.cat([p.main_grad.flatten() for p in model.parameters()]).norm().item()


def _grad_norms(rank, world, tp, family):
    ps = ParallelState.create(tp=tp)
    try:
        out = {}
        for distopt in (False, True):
            model, ddp, opt = build_trainable(ps, {"use_distributed_optimizer": distopt}, family=family)
            data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
            out[distopt] = train_step(ddp, opt, data, num_microbatches(ps), ps, CPU).grad_norm.item()
        return out
    finally:
        ps.destroy()


@pytest.mark.parametrize("family", ["gpt", "llama"])  # tied + biases + SP norms / untied, RMSNorm
def test_clip_norm_is_the_dense_gradient_norm_tp2_dp2(run_dist, family):
    dense = _dense_grad_norm(family)
    for rank, norms in enumerate(run_dist(4, _grad_norms, 2, family)):
        for distopt, norm in norms.items():
            assert norm == pytest.approx(dense, rel=1e-5), f"rank {rank} distributed optimizer {distopt}"


class _Schedule:
    def step(self, samples):
        pass


def _train_with_inf(rank, world, tp, distopt, bad_rank, bad_iteration=3, iters=4):
    """fp16 with the dynamic scaler through the real loop; at `bad_iteration` one gradient
    becomes inf on global rank `bad_rank` only."""
    ps = ParallelState.create(tp=tp)
    try:
        scaler = DynamicLossScaler(initial_scale=1024.0, hysteresis=1)
        model, ddp, opt = build_trainable(
            ps, {"use_distributed_optimizer": distopt, "grad_reduce_in_fp32": False},
            model_kw={"params_dtype": torch.float16}, scaler=scaler)
        # A norm's weight: the gradients of linear weights and biases and of the embedding table
        # bypass tensor hooks (gradient-accumulation fusion).
        weight = dict(model.named_parameters())["decoder.layers.0.input_layernorm.weight"]
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        snapshots, outcomes = [], []

        def step(num_micro):
            bad = len(outcomes) + 1 == bad_iteration and ps.rank == bad_rank
            handle = weight.register_hook(lambda g: torch.full_like(g, float("inf"))) if bad else None
            result = train_step(ddp, opt, data, num_micro, ps, CPU)
            if handle is not None:
                handle.remove()
            ddp.finish_param_sync()
            snapshots.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
            outcomes.append(result.update_successful)
            return result

        out = io.StringIO()
        cfg = LoopConfig(train_iters=iters, log_interval=iters, seq_length=SEQ, world_size=world,
                         flops_per_sample=1.0)
        trainer = Trainer(cfg, LoopHooks(step), optimizer=opt, scheduler=_Schedule(),
                          batches=MicroBatchCalculator(GLOBAL_BATCH, MICRO_BATCH, ps.dp_size),
                          timers=Timers(), logger=RankLogger(rank, world, out),
                          tensorboard=TensorboardLogger(TensorboardConfig(None), True), device=CPU)
        trainer.train(LoopState())
        unchanged = [torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:])]
        return out.getvalue(), outcomes, unchanged
    finally:
        ps.destroy()


_LINE = re.compile(r"iteration +(\d+)/.*?loss scale: ([\d.]+) \|.*?number of skipped iterations: +(\d+) \| "
                   r"number of nan iterations: +(\d+) \|")


@pytest.mark.parametrize("distopt", [False, True], ids=["plain", "distopt"])
def test_inf_gradient_on_one_rank_skips_exactly_one_iteration(run_dist, distopt):
    results = run_dist(4, _train_with_inf, 2, distopt, 3)  # TP=2 x DP=2, inf on TP 1 / DP 1 only
    for rank, (_, outcomes, unchanged) in enumerate(results):
        assert outcomes == [True, True, False, True], f"rank {rank}"
        assert unchanged == [False, True, False], f"rank {rank}"  # step 3 left every param alone
    lines = [m.groups() for m in _LINE.finditer(results[-1][0])]  # the last rank prints
    # (iteration, loss scale, skipped, nan): hysteresis 1 halves the scale at the overflow.
    assert lines == [("1", "1024.0", "0", "0"), ("4", "512.0", "1", "0")]


def _optimizer_bytes(rank, world, dtype):
    ps = ParallelState.create()
    try:
        out = {}
        for distopt in (False, True):
            model, ddp, opt = build_trainable(ps, {"use_distributed_optimizer": distopt},
                                              model_kw={"params_dtype": dtype})
            data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
            train_step(ddp, opt, data, num_microbatches(ps), ps, CPU)  # Adam state exists after a step
            out[distopt] = opt.state_bytes()
        return out, sum(p.numel() for p in model.parameters())
    finally:
        ps.destroy()


@pytest.mark.parametrize("dtype,per_param", [(torch.float32, 8), (torch.bfloat16, 12)], ids=["fp32", "bf16"])
def test_distributed_optimizer_divides_optimizer_memory_by_dp(run_dist, dtype, per_param):
    """spec §8.3: Adam moments (8 B/param), plus fp32 masters (4 B/param) for bf16 params."""
    for rank, (sizes, n) in enumerate(run_dist(4, _optimizer_bytes, dtype)):
        assert sizes[False] == per_param * n
        # 1/4 of it, plus the 64-element param alignment and lcm(4, 128) bucket padding.
        assert per_param * n / 4 <= sizes[True] <= 1.05 * per_param * n / 4, f"rank {rank}: {sizes}"

"""`--optimizer-cpu-offload`: the hybrid host/device step trains exactly like the plain optimizer
(losses, grad norms, every parameter) at offload fractions 0.5 and 1.0, with and without the
distributed optimizer, with and without overlapped copies, for DP 1/2 and DP2 x TP2; and the
requested fraction of the state is the part the host holds. On the CPU-only test machine host
and device are the same memory, but the split, the staged copies in chunks, the host step and
the write-back all run."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.optimizer.cpu_offload import OffloadConfig, offloaded_prefix
from megatron_lite.training.train_step import train_step
from tests.distributed.test_data_parallel import _reference, assert_same_training
from tests.dp_utils import CPU, build_trainable, micro_batches, num_microbatches, train

# 3000 elements per staging chunk: the tiny GPT (110k params) goes through dozens of chunks.
CHUNK = 3000
VARIANTS = {
    f"{opt}-{fraction}{'-overlap' if overlap else ''}": (opt == "distopt", fraction, overlap)
    for opt in ("plain", "distopt") for fraction in (0.5, 1.0) for overlap in (False, True)
}


def _run(rank, world, tp, names, model_kw=None):
    ps = ParallelState.create(tp=tp)
    try:
        out = {}
        for name in names:
            distopt, fraction, overlap = VARIANTS[name]
            offload = OffloadConfig(fraction, overlap, chunk_elements=CHUNK)
            out[name] = train(ps, {"use_distributed_optimizer": distopt}, model_kw, offload=offload)
        return out
    finally:
        ps.destroy()


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 1), (4, 2)], ids=["dp1", "dp2", "dp2xtp2"])
def test_offloaded_training_matches_the_plain_run(run_dist, world, tp):
    ref = _reference()
    names = list(VARIANTS)
    results = [_run(0, 1, 1, names)] if world == 1 else run_dist(world, _run, tp, names)
    for rank, per_variant in enumerate(results):
        for name, got in per_variant.items():
            # The host step is torch's fused CPU AdamW, the reference the single-tensor loop:
            # they differ in the last bit (2e-7), far inside these tolerances.
            assert_same_training(got, ref, f"world {world} tp {tp} {name} rank {rank}")


def test_bf16_offloaded_training_tracks_the_plain_run(run_dist):
    """bf16 params: the host casts the updated fp32 mains to bf16 before the copy back."""
    bf16 = {"params_dtype": torch.bfloat16}
    ref = _reference(bf16)
    names = ["plain-0.5", "distopt-1.0-overlap"]
    for rank, got in enumerate(run_dist(2, _run, 1, names, bf16)):
        for name, run in got.items():
            assert_same_training(run, ref, f"bf16 {name} rank {rank}", rtol=1e-3, atol=1e-3, param_atol=1e-2)


def test_offloaded_prefix_stays_within_the_fraction():
    assert offloaded_prefix([4, 4, 4, 4], 1.0) == 4
    assert offloaded_prefix([4, 4, 4, 4], 0.5) == 2
    assert offloaded_prefix([4, 4, 4, 4], 0.6) == 2
    assert offloaded_prefix([10, 1], 0.5) == 0
    assert offloaded_prefix([], 1.0) == 0


def _memory_split(rank, world, distopt, fraction):
    ps = ParallelState.create()
    try:
        model, ddp, opt = build_trainable(ps, {"use_distributed_optimizer": distopt},
                                          offload=OffloadConfig(fraction, chunk_elements=CHUNK))
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        train_step(ddp, opt, data, num_microbatches(ps), ps, CPU)  # Adam state exists after a step
        host = opt.inner.host_elements()
        device = sum(t.numel() for g in opt.inner.device_opt.param_groups for t in g["params"])
        return host, device, opt.state_bytes(), opt.state_bytes(on_host=True)
    finally:
        ps.destroy()


@pytest.mark.parametrize("distopt", [False, True], ids=["plain", "distopt"])
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_the_host_holds_the_requested_fraction(run_dist, distopt, fraction):
    results = run_dist(2, _memory_split, distopt, fraction)
    for rank, (host, device, device_bytes, host_bytes) in enumerate(results):
        total = host + device
        # Whole parameters (or slices of a shard) move: within the largest one (fc1, 16384).
        assert fraction * total - 16384 <= host <= fraction * total, f"rank {rank}: {host} of {total}"
        assert host_bytes >= 8 * host  # fp32 Adam moments of every host element (fp32 model: no copies)
        if fraction == 1.0:
            assert device == 0 and device_bytes == 0, f"rank {rank}"


def _fp16_run(rank, world, fraction):
    """fp16 with the dynamic scaler from 2^20: early steps overflow and are skipped."""
    from megatron_lite.models.init import gather_global
    from megatron_lite.optimizer.grad_scaler import DynamicLossScaler

    ps = ParallelState.create()
    try:
        offload = OffloadConfig(fraction, chunk_elements=CHUNK) if fraction else None
        ddp_kw = {"use_distributed_optimizer": True, "grad_reduce_in_fp32": False}
        model, ddp, opt = build_trainable(ps, ddp_kw, model_kw={"params_dtype": torch.float16},
                                          scaler=DynamicLossScaler(initial_scale=2.0**20, hysteresis=1),
                                          offload=offload)
        data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
        outcomes = [train_step(ddp, opt, data, num_microbatches(ps), ps, CPU).update_successful
                    for _ in range(4)]
        ddp.finish_param_sync()
        return outcomes, opt.scaler.scale, gather_global(model, None)
    finally:
        ps.destroy()


def test_fp16_skipped_steps_leave_offloaded_state_alone(run_dist):
    ref_outcomes, ref_scale, ref_params = run_dist(2, _fp16_run, 0.0)[0]
    assert False in ref_outcomes and True in ref_outcomes  # both paths are exercised
    for rank, (outcomes, scale, params) in enumerate(run_dist(2, _fp16_run, 1.0)):
        assert (outcomes, scale) == (ref_outcomes, ref_scale), f"rank {rank}"
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value, rtol=1e-3, atol=1e-3,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")

"""GPT and Llama under tensor (and sequence) parallelism equal the single-process model:
logits, loss and every parameter gradient, for TP = 2 and 4."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from tests.model_utils import one_step, tiny_config


def _run(rank, world, family, sp, overrides):
    ps = ParallelState.create(tp=world)
    try:
        cfg = tiny_config(family, sequence_parallel=sp and world > 1, **overrides)
        return one_step(cfg, ps)
    finally:
        ps.destroy()


_REFERENCE = {}


def _reference(family, overrides):
    key = (family, tuple(sorted(overrides.items())))
    if key not in _REFERENCE:
        _REFERENCE[key] = _run(0, 1, family, False, overrides)
    return _REFERENCE[key]


def _assert_close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_matches_dense(run_dist, family, tp, sp):
    ref_logits, ref_loss, ref_grads = _reference(family, {})
    for rank, (logits, loss, grads) in enumerate(run_dist(tp, _run, family, sp, {})):
        _assert_close(logits, ref_logits, f"logits rank {rank}")
        _assert_close(loss, ref_loss, f"loss rank {rank}")
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            _assert_close(g, ref_grads[name], f"grad {name} rank {rank}")


@pytest.mark.parametrize("overrides", [
    {"attention_backend": "unfused"},
    {"apply_layernorm_1p": True, "add_qkv_bias": True, "untie_embeddings_and_output_weights": True},
    {"position_embedding_type": "rope", "rotary_percent": 0.5, "label_smoothing": 0.1},
    {"fp32_residual_connection": True, "normalization": "RMSNorm", "swiglu": True, "kv_channels": 16},
])
def test_gpt_variants_tp2(run_dist, overrides):
    ref_logits, ref_loss, ref_grads = _reference("gpt", overrides)
    for logits, loss, grads in run_dist(2, _run, "gpt", True, overrides):
        _assert_close(logits, ref_logits, "logits")
        _assert_close(loss, ref_loss, "loss")
        for name, g in grads.items():
            _assert_close(g, ref_grads[name], f"grad {name}")


def _gqa_too_few_groups(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        one_step(tiny_config("llama", num_query_groups=2), ps)
    except ValueError as e:
        return str(e)
    finally:
        ps.destroy()
    return None


def test_gqa_fewer_kv_heads_than_tp_is_rejected(run_dist):
    messages = run_dist(4, _gqa_too_few_groups)
    assert all(m and "--num-query-groups (2)" in m and "--tensor-model-parallel-size (4)" in m
               for m in messages)

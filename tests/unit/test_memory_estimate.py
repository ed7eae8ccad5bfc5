"""The per-GPU memory estimate printed before training (training/memory_estimate.py): the bytes
per parameter of every optimizer layout, the measured Llama-3-8B DP2 + distributed-optimizer
peak, and one-line refusals that name flags which fit."""
import pytest
import torch

from megatron_lite.config.configs import ModelConfig
from megatron_lite.training.memory_estimate import (
    MemoryLayout,
    check_fits,
    describe,
    estimate,
    suggestions,
)

GIB = 2.0**30
H200 = 139.8 * GIB  # total_memory of one H200 as torch reports it
LLAMA3_8B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                        num_query_groups=8, vocab_size=128256, max_position_embeddings=8192, swiglu=True,
                        normalization="RMSNorm", untie_embeddings_and_output_weights=True,
                        position_embedding_type="rope", add_bias_linear=False, params_dtype=torch.bfloat16)
N_8B = 8.03e9


def _layout(**kw):
    return MemoryLayout(**{"seq_length": 2048, "num_microbatches": 32, **kw})


@pytest.mark.parametrize("kw,per_param", [
    ({}, 2 + 4 + 4 + 8),  # bf16 params, fp32 main grads, fp32 mains, Adam moments (spec §8.3: 18)
    ({"dp": 2, "distributed_optimizer": True}, 6 + 12 / 2),
    ({"dp": 4, "distributed_optimizer": True, "offload_fraction": 0.5}, 6 + 0.5 * 12 / 4),
    ({"offload_fraction": 1.0}, 6),
    ({"dp": 2, "fsdp2": True}, 16 / 2),
    ({"optimizer": "sgd"}, 2 + 4 + 4 + 4),
    ({"grad_fp32": False}, 2 + 2 + 4 + 8),  # --grad-reduce-in-bf16
])
def test_static_bytes_per_parameter(kw, per_param):
    est = estimate(LLAMA3_8B, _layout(**kw))
    static = est.weights + est.grads + est.optimizer
    assert static == pytest.approx(per_param * N_8B, rel=0.01)


def test_offloaded_state_is_counted_on_the_host():
    est = estimate(LLAMA3_8B, _layout(offload_fraction=0.25))
    assert est.host == pytest.approx(0.25 * 12 * N_8B, rel=0.01)
    assert "optimizer state offloaded to host memory" in describe(est, H200)


def test_matches_the_measured_dp2_distributed_optimizer_peak():
    """Llama-3-8B, seq 2048, micro batch 1, DP2 + distributed optimizer on 2 H200: 103 GB
    measured (max allocated, MB of 2^20 bytes); the estimate is within 5 %."""
    est = estimate(LLAMA3_8B, _layout(dp=2, distributed_optimizer=True))
    assert est.total / 2**20 == pytest.approx(103_000, rel=0.05)


def test_activations_shrink_with_full_recompute_tp_sp_and_cp():
    base = estimate(LLAMA3_8B, _layout()).activations
    cfg = ModelConfig(**{**LLAMA3_8B.__dict__, "recompute_granularity": "full", "recompute_method": "uniform",
                         "recompute_num_layers": 1})
    assert estimate(cfg, _layout()).activations < base / 3
    sp = ModelConfig(**{**LLAMA3_8B.__dict__, "sequence_parallel": True})
    assert estimate(sp, _layout(tp=2)).activations == pytest.approx(base / 2, rel=0.01)
    assert estimate(LLAMA3_8B, _layout(cp=2)).activations == pytest.approx(base / 2, rel=0.01)


def test_tp_comm_overlap_holds_the_qkv_and_fc1_inputs_gathered():
    """--tp-comm-overlap saves the column-parallel inputs gathered (tensor_parallel/layers.py):
    per layer 4 sbh of activation bytes instead of 4 sbh / tp, and the output layer's 2 sbh."""
    sp = ModelConfig(**{**LLAMA3_8B.__dict__, "sequence_parallel": True})
    overlap = ModelConfig(**{**sp.__dict__, "tp_comm_overlap": True})
    extra = estimate(overlap, _layout(tp=2)).activations - estimate(sp, _layout(tp=2)).activations
    sbh_bytes = 2048 * 1 * 4096 * 2  # one micro-batch's [s, b, h] in bf16
    assert extra == pytest.approx((32 * 2 + 1) * sbh_bytes * (1 - 1 / 2))


def test_fsdp2_needs_less_than_the_distributed_optimizer():
    fsdp = estimate(LLAMA3_8B, _layout(dp=2, fsdp2=True))
    distopt = estimate(LLAMA3_8B, _layout(dp=2, distributed_optimizer=True))
    assert fsdp.gathered > 0 and fsdp.total < distopt.total


def test_an_8b_model_on_one_gpu_is_refused_with_the_flags_that_fit():
    message = check_fits(LLAMA3_8B, _layout(num_microbatches=64), H200)
    assert message is not None and "\n" not in message
    assert message.startswith("this layout needs about 145.")
    assert "--optimizer-cpu-offload --optimizer-offload-fraction" in message
    assert check_fits(LLAMA3_8B, _layout(num_microbatches=64, offload_fraction=1.0), H200) is None


def test_data_parallel_layouts_suggest_sharding():
    tips = suggestions(LLAMA3_8B, _layout(dp=2), H200)
    assert tips[:2] == ["--use-distributed-optimizer", "--use-torch-fsdp2 --no-gradient-accumulation-fusion"]


def test_offload_that_overflows_the_host_is_refused():
    message = check_fits(LLAMA3_8B, _layout(offload_fraction=1.0), H200, host=64 * GIB)
    assert message is not None and "--optimizer-offload-fraction 1" in message and "host" in message


def test_no_gpu_means_no_refusal():
    assert check_fits(LLAMA3_8B, _layout(), None) is None

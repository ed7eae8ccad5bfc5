"""Megatron-LM flags whose meaning is already megatron_lite's only behaviour, with the reason.

DESIGN rule 12 says every flag works or is refused by name. These flags work in the plain
sense: what they ask Megatron-LM for is what megatron_lite always does (or, for the two legacy
flags, Megatron-LM itself ignores them), so accepting them changes nothing and refusing them
would only break launch scripts. Each reason is the flag's `--help` text, so a user reading the
help sees why the flag has no further effect; tests/unit/test_flags_read.py checks both.
"""
from __future__ import annotations

from types import MappingProxyType

ACCEPTED_AS_IS = MappingProxyType({
    # Legacy flags that Megatron-LM parses and reads nowhere.
    "deprecated_use_mcore_models":
        "DEPRECATED in Megatron-LM, which ignores it too: mcore models are the default (and the only "
        "models of megatron_lite).",
    "use_flash_attn":
        "Legacy-model flag that Megatron-LM's mcore models ignore too; the attention kernel is chosen "
        "by --attention-backend.",
    # Checkpoint behaviour that megatron_lite has unconditionally.
    "use_persistent_ckpt_worker":
        "Use one persistent background worker for --async-save: megatron_lite's async saver always "
        "is one (a thread that lives for the run, with reused host buffers).",
    "ckpt_fully_parallel_load":
        "Spread checkpoint reading over the data-parallel group: megatron_lite always does, every "
        "rank reads only the slices it holds.",
    "ckpt_assume_constant_structure":
        "Performance hint (Megatron-LM caches the checkpoint structure between saves): megatron_lite "
        "plans every save afresh, so the flag changes nothing observable.",
    "dist_ckpt_optim_fully_reshardable":
        "Save optimizer state reshardable across TP/PP as well as DP: megatron_lite's checkpoints "
        "always are (spec §4.3).",
    "auto_detect_ckpt_format":
        "Detect the format of the checkpoint being loaded: megatron_lite's --load always does "
        "(its own or Megatron-LM's torch_dist) and refuses other formats by name.",
    # Model computations megatron_lite has one way of doing.
    "openai_gelu":
        "OpenAI's tanh-approximated GeLU: already megatron_lite's GeLU (spec §10).",
    "bias_gelu_fusion":
        "--no-bias-gelu-fusion: disable the fused bias+GeLU kernel; megatron_lite adds the bias in "
        "the GEMM's epilogue and its tanh GeLU is one kernel forward and one backward either way "
        "(spec §11), so results are those of the unfused path.",
    "masked_softmax_fusion":
        "--no-masked-softmax-fusion: disable the fused scale-mask-softmax kernel; megatron_lite has "
        "none (flash/cuDNN attention fuse the softmax themselves, the unfused path is plain PyTorch "
        "ops), so results are those of the unfused path.",
    "bias_dropout_fusion":
        "--no-bias-dropout-fusion: disable the fused bias+dropout+add kernel; megatron_lite's "
        "dropout-add is never fused (plain PyTorch ops), so results are those of the unfused path.",
})

"""`--use-checkpoint-args` (spec §4.5): take the model's shape from the checkpoint being loaded,
so a run can resume or finetune with only `--load` and the training flags.

Read before the arguments are validated: every rank reads `common.json` (JSON, no code runs),
or a Megatron-LM checkpoint's pickled args through the allowlist unpickler (megatron/pickles.py).
"""
from __future__ import annotations

from megatron_lite.checkpoint.layout import iteration_dir, read_tracker
from megatron_lite.checkpoint.megatron.record import read_any_record

# Taken from the checkpoint only when the command line left them unset (None), as in Megatron.
_IF_UNSET = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
             "kv_channels", "max_position_embeddings", "vocab_size", "tokenizer_model", "vocab_file",
             "merge_file")
# Always taken from the checkpoint: switches and values with defaults, where the command line
# cannot tell "not given" from "given as the default".
_ALWAYS = ("num_query_groups", "group_query_attention", "position_embedding_type",
           "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved",
           "rotary_seq_len_interpolation_factor", "use_rope_scaling", "rope_scaling_factor",
           "add_bias_linear", "add_qkv_bias", "squared_relu", "openai_gelu", "swiglu",
           "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization", "norm_epsilon",
           "qk_layernorm", "apply_residual_connection_post_layernorm", "fp32_residual_connection",
           "make_vocab_size_divisible_by", "attention_dropout", "hidden_dropout")


def saved_args(root: str, ckpt_step: int | None = None) -> dict | None:
    """The arguments stored with the checkpoint `--load` points at; None if there is none."""
    found = read_tracker(root) if ckpt_step is None else (ckpt_step, False)
    if found is None:
        return None
    directory = iteration_dir(root, found[0], release=found[1])
    return read_any_record(directory, required=("args",))[0]["args"]


def checkpoint_arg_updates(current: dict, saved: dict) -> dict:
    """The model-shape values to take from `saved` (the checkpoint's arguments) over `current`
    (the command line's): name -> value, for the names whose value differs. The caller, at the
    edge where args live (training/checkpointing.py), applies them."""
    updates = {}
    for name in _IF_UNSET + _ALWAYS:
        if name not in saved or name not in current:
            continue
        if name in _IF_UNSET and current[name] is not None:
            continue
        if current[name] != saved[name]:
            updates[name] = saved[name]
    return updates

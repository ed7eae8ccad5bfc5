"""The domain of every numeric flag that has one, as a table, and the check that applies it.

Issue 15: an out-of-domain number (`--log-interval 0`, `--adam-beta1 1.5`, a NaN blend weight)
must fail at startup with one line naming the flag and the value, not be accepted silently or
surface later as a traceback. Each row is (dest, domain); `None` (flag not given) always
passes, and NaN or infinity is never inside a domain. Where Megatron gives a value a special
meaning, the domain keeps it (spec §10: `--clip-grad 0` disables clipping, `--eval-iters 0`
disables evaluation; Megatron's loop treats `--exit-interval 0` as unset). Cross-flag rules
(divisibility, mutual exclusion) stay in `validation.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from megatron_lite.config.errors import ConfigError, flag
from megatron_lite.data.splits import parse_blend, parse_split


@dataclass(frozen=True)
class Domain:
    text: str  # completes "--flag must be ...", e.g. ">= 1" or "in [0, 1)"
    test: Callable[[float], bool]
    note: str = ""  # the special meaning of a boundary value, appended to the message

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and self.test(value)


def _at_least(low: float, note: str = "") -> Domain:
    return Domain(f">= {low}", lambda v: v >= low, note)


def _above(low: float) -> Domain:
    return Domain(f"> {low}", lambda v: v > low)


def _unit_interval() -> Domain:
    # Probabilities and Adam betas: 1 would drop everything / never forget a gradient.
    return Domain("in [0, 1)", lambda v: 0 <= v < 1)


POSITIVE = _at_least(1)
NON_NEGATIVE = _at_least(0)
POSITIVE_REAL = _above(0)

# (dest, domain). Frozen: a tuple of frozen dataclasses, read by `check_ranges`.
RANGES: tuple[tuple[str, Domain], ...] = (
    # network size (--num-layers, --hidden-size, ... are required and checked in validation.py)
    ("decoder_num_layers", POSITIVE),
    ("ffn_hidden_size", POSITIVE),
    ("kv_channels", POSITIVE),
    ("num_query_groups", POSITIVE),
    ("max_position_embeddings", POSITIVE),
    ("rotary_base", POSITIVE),
    ("rotary_percent", Domain("in (0, 1]", lambda v: 0 < v <= 1)),
    ("rotary_seq_len_interpolation_factor", POSITIVE),
    ("rope_scaling_factor", POSITIVE_REAL),
    ("make_vocab_size_divisible_by", POSITIVE),
    ("norm_epsilon", POSITIVE_REAL),
    # regularization and optimizer
    ("attention_dropout", _unit_interval()),
    ("hidden_dropout", _unit_interval()),
    ("weight_decay", NON_NEGATIVE),
    ("start_weight_decay", NON_NEGATIVE),
    ("end_weight_decay", NON_NEGATIVE),
    ("clip_grad", _at_least(0, "0 disables clipping")),
    ("adam_beta1", _unit_interval()),
    ("adam_beta2", _unit_interval()),
    ("adam_eps", POSITIVE_REAL),
    ("sgd_momentum", _unit_interval()),
    ("optimizer_offload_fraction", Domain("in [0, 1]", lambda v: 0 <= v <= 1)),
    ("label_smoothing", _unit_interval()),
    # training length, exits, housekeeping
    ("global_batch_size", POSITIVE),
    ("train_iters", POSITIVE),
    ("train_samples", POSITIVE),
    ("exit_interval", _at_least(0, "0 never exits")),
    ("exit_duration_in_mins", _at_least(0, "0 sets no time limit")),
    ("manual_gc_interval", _at_least(0, "0 collects only around evaluation")),
    ("profile_step_start", NON_NEGATIVE),
    ("profile_step_end", NON_NEGATIVE),
    ("profile_ranks", NON_NEGATIVE),
    ("check_weight_hash_across_dp_replicas_interval", POSITIVE),
    # initialization: numpy's RandomState (dataset shuffling, spec §2.5) takes [0, 2^32).
    ("seed", Domain("in [0, 4294967295]", lambda v: 0 <= v < 2**32)),
    ("init_method_std", POSITIVE_REAL),
    ("embedding_init_method_std", POSITIVE_REAL),
    # learning rate (the scheduler needs a positive decay horizon, spec §10 "LR formula")
    ("lr", NON_NEGATIVE),
    ("min_lr", NON_NEGATIVE),
    ("lr_decay_iters", POSITIVE),
    ("lr_decay_samples", POSITIVE),
    ("lr_wsd_decay_iters", NON_NEGATIVE),
    ("lr_wsd_decay_samples", NON_NEGATIVE),
    ("lr_warmup_fraction", _unit_interval()),
    ("lr_warmup_iters", NON_NEGATIVE),
    ("lr_warmup_samples", NON_NEGATIVE),
    ("lr_warmup_init", NON_NEGATIVE),
    ("decoupled_lr", NON_NEGATIVE),
    ("decoupled_min_lr", NON_NEGATIVE),
    # checkpointing
    ("save_interval", POSITIVE),
    ("non_persistent_save_interval", POSITIVE),
    ("ckpt_step", NON_NEGATIVE),
    ("override_ckpt_iteration", NON_NEGATIVE),
    # mixed precision (spec §7.1); the window is compared with a step counter, so a whole number
    ("loss_scale", POSITIVE_REAL),
    ("initial_loss_scale", POSITIVE_REAL),
    ("min_loss_scale", POSITIVE_REAL),
    ("loss_scale_window", Domain("a whole number >= 1", lambda v: v >= 1 and v == int(v))),
    ("hysteresis", POSITIVE),
    # distributed (TP/PP/CP and the virtual-pipeline sizes are checked in validation.py)
    ("microbatch_group_size_per_vp_stage", POSITIVE),
    ("dpp_gpu_queue_depth", NON_NEGATIVE),
    ("cuda_graph_warmup_steps", NON_NEGATIVE),
    ("distributed_timeout_minutes", POSITIVE),
    ("local_rank", NON_NEGATIVE),
    ("num_distributed_optimizer_instances", POSITIVE),
    ("ddp_bucket_size", POSITIVE),
    ("ddp_num_buckets", POSITIVE),
    ("hierarchical_context_parallel_sizes", POSITIVE),
    ("expert_tensor_parallel_size", POSITIVE),
    ("moe_router_topk", POSITIVE),
    # MegatronDPP's transport flags (config/dpp_flags.py): accepted with a warning, but a
    # nonsensical value is still an error
    ("workload", POSITIVE),
    ("num_gpus", POSITIVE),
    # evaluation (spec §10: --eval-iters 0 disables validation and test)
    ("eval_iters", _at_least(0, "0 disables evaluation")),
    ("eval_interval", POSITIVE),
    ("eval_micro_batch_size", POSITIVE),
    ("eval_global_batch_size", POSITIVE),
    # data and tokenizer
    ("num_workers", NON_NEGATIVE),
    ("num_dataset_builder_threads", POSITIVE),
    ("mid_level_dataset_surplus", NON_NEGATIVE),
    ("vocab_size", POSITIVE),
    ("padded_vocab_size", POSITIVE),
    ("null_tokenizer_eod_id", NON_NEGATIVE),
    ("tiktoken_num_special_tokens", NON_NEGATIVE),
    # logging: each interval is a modulus of the iteration number
    ("log_interval", POSITIVE),
    ("logging_level", NON_NEGATIVE),
    ("log_memory_interval", POSITIVE),
    ("tensorboard_log_interval", POSITIVE),
    ("tensorboard_queue_size", POSITIVE),
)

# Flags whose spelling is not their dest's (argparse `dest=`); messages name what users type.
_SPELLED = {"microbatch_group_size_per_vp_stage": "--microbatch-group-size-per-virtual-pipeline-stage"}


def flag_of(dest: str) -> str:
    return _SPELLED.get(dest) or flag(dest)


# Numeric flags without a row: required sizes, parallel sizes and other values that
# validation.py checks together with the flags they relate to, or whose choices= bound them.
CHECKED_ELSEWHERE = frozenset({
    "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
    "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
    "num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
    "rampup_batch_size", "recompute_num_layers", "save_retain_interval", "num_experts",
    "expert_model_parallel_size", "empty_unused_memory_level", "timing_log_level",
    "max_tokens_to_oom",  # refused unless left at Megatron's default (megatron_flags.py)
})


def check_ranges(args) -> None:
    """Refuse the first flag whose value (or any of its values) lies outside its domain, then
    a malformed --split or a bad blend weight. Only reads `args`; safe to call twice."""
    for dest, domain in RANGES:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if v is not None and not domain.holds(v):
                note = f"; {domain.note}" if domain.note else ""
                raise ConfigError(f"{flag_of(dest)} must be {domain.text} (got {v}){note}")
    _check_loss_scale_bounds(args)
    if getattr(args, "split", None) is not None:
        _reraise_as_config_error(parse_split, args.split, "")
    for dest in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        if getattr(args, dest, None):
            _reraise_as_config_error(parse_blend, getattr(args, dest), f"{flag(dest)}: ")


def _check_loss_scale_bounds(args) -> None:
    # The dynamic scaler never goes below its floor, so a floor above the start is contradictory.
    if getattr(args, "fp16", False) and not getattr(args, "loss_scale", None):
        low, start = args.min_loss_scale, args.initial_loss_scale
        if low > start:
            raise ConfigError(f"--min-loss-scale ({low}) must be <= --initial-loss-scale ({start})")


def _reraise_as_config_error(parse: Callable, value, prefix: str) -> None:
    try:
        parse(value)
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def check_rotary_dims(args) -> None:
    """RoPE rotates channel pairs: int(--kv-channels x --rotary-percent) must be a positive even
    number, else the cos/sin tables do not match the rotated slice. Needs `kv_channels` derived."""
    if args.position_embedding_type != "rope":
        return
    kv, pct = args.kv_channels, args.rotary_percent
    dim = int(kv * pct)
    if dim < 2 or dim % 2:
        raise ConfigError(f"--rotary-percent ({pct}) x --kv-channels ({kv}) gives {dim} rotary channels; "
                          "it must be a positive even number")

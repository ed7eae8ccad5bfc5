"""Megatron-LM flags that megatron_lite maps onto its own settings, announces as deprecated, or
refuses by name because it cannot give them Megatron's meaning (DESIGN rule 12: every flag works
or is refused in one line; none is parsed and ignored).

`check_megatron_flags_early` runs first in `validate_args` (aliases feed the derivations that
follow); `check_megatron_flags_late` runs last, on derived values, so that validating twice is
stable. Flags whose Megatron meaning is megatron_lite's only behaviour live in
`accepted_as_is.py` instead.
"""
from __future__ import annotations

from collections.abc import Callable

from megatron_lite.config.errors import ConfigError
from megatron_lite.config.errors import flag as _flag
from megatron_lite.data.tokenizers import SUPPORTED_TYPES

NOT_SUPPORTED = "is not supported by megatron_lite"
# Megatron-LM's default of --max-tokens-to-oom (its inference group).
_MAX_TOKENS_TO_OOM_DEFAULT = 12000
# --dist-ckpt-strictness values megatron_lite's loader cannot honour, with the reason.
_STRICTNESS_REFUSED = {
    "raise_all": "checkpoint tensors the model lacks are skipped, not an error; use raise_unexpected",
    "return_unexpected": "it hands mismatches to a calling program; use log_all",
    "return_all": "it hands mismatches to a calling program; use log_all",
}


def check_megatron_flags_early(args, warn: Callable[[str], None]) -> None:
    """Aliases and refusals that must precede the derivations of `validate_args`."""
    decoder_layers = args.decoder_num_layers
    if decoder_layers is not None:
        # Megatron's decoder layer count; a GPT is a decoder, so it is --num-layers.
        if args.num_layers is None:
            args.num_layers = decoder_layers
        elif args.num_layers != decoder_layers:
            raise ConfigError(f"--decoder-num-layers ({decoder_layers}) differs from --num-layers "
                              f"({args.num_layers}); a GPT has only decoder layers")
    if args.transformer_impl == "local":
        # Megatron-LM's local layer spec attends with its own unfused DotProductAttention
        # whatever --attention-backend says; asking for a fused kernel there is a contradiction.
        if args.attention_backend in ("flash", "fused"):
            raise ConfigError(f"--attention-backend {args.attention_backend} needs --transformer-impl "
                              "transformer_engine (Megatron-LM's local layers attend unfused)")
        if args.attention_backend == "auto":
            args.attention_backend = "local"
    if args.ckpt_fully_parallel_save_deprecated:
        # Megatron-LM's own notice for this deprecated flag (arguments.py validate_args).
        warn("--ckpt-fully-parallel-save flag is deprecated and has no effect. "
             "Use --no-ckpt-fully-parallel-save to disable parallel save.")
    t = args.tokenizer_type
    if t is not None and t not in SUPPORTED_TYPES:
        # Never replaced by another tokenizer: a different vocabulary changes the model.
        raise ConfigError(f"--tokenizer-type {t} {NOT_SUPPORTED} (supported: {', '.join(SUPPORTED_TYPES)})")
    for dest, why in (("spec", "its layers are built from the model flags, not from a layer spec"),
                      ("step_batch_size_schedule", "use --rampup-batch-size")):
        if getattr(args, dest) is not None:
            raise ConfigError(f"{_flag(dest)} {NOT_SUPPORTED} ({why})")
    if args.rerun_mode != "disabled":
        raise ConfigError(f"--rerun-mode {args.rerun_mode} {NOT_SUPPORTED} (only disabled: a NaN loss "
                          "stops the run with an error, without re-running the step)")
    if args.max_tokens_to_oom != _MAX_TOKENS_TO_OOM_DEFAULT:
        raise ConfigError("--max-tokens-to-oom is a flag of Megatron-LM's inference server, which "
                          "megatron_lite does not have")


def check_megatron_flags_late(args) -> None:
    """Refusals that read derived values (run after every derivation of `validate_args`)."""
    _refuse_model_flags(args)
    _refuse_parallel_flags(args)
    _refuse_checkpoint_flags(args)
    for dest in ("wandb_entity", "wandb_exp_name", "wandb_save_dir"):
        if getattr(args, dest):
            raise ConfigError(f"{_flag(dest)} needs --wandb-project (W&B), which megatron_lite does not "
                              "support")


def _refuse_model_flags(args) -> None:
    for dest in ("qk_layernorm", "apply_residual_connection_post_layernorm", "distribute_saved_activations"):
        if getattr(args, dest):
            raise ConfigError(f"{_flag(dest)} {NOT_SUPPORTED}")
    if args.fp16_lm_cross_entropy:
        raise ConfigError(f"--fp16-lm-cross-entropy {NOT_SUPPORTED} (the cross entropy runs in fp32)")
    extra = [m for m in args.recompute_modules if m != "core_attn"]
    if extra:
        raise ConfigError(f"--recompute-modules {' '.join(extra)} {NOT_SUPPORTED} (only core_attn)")
    if args.cross_entropy_fusion_impl == "te":
        raise ConfigError("--cross-entropy-fusion-impl te needs Transformer Engine, which megatron_lite "
                          "does not use (native is supported)")
    if args.fp8_recipe != "delayed":
        raise ConfigError("--fp8-recipe needs --fp8-format, which megatron_lite does not support")


def _refuse_parallel_flags(args) -> None:
    if args.grad_reduce_in_bf16 and not args.bf16:
        # Megatron-LM reads it only under --bf16 (spec §7.1); elsewhere it would be ignored.
        raise ConfigError("--grad-reduce-in-bf16 needs --bf16")
    moe = "needs --num-experts (mixture of experts), which megatron_lite does not support"
    if args.moe_router_topk != 2:
        raise ConfigError(f"--moe-router-topk {moe}")
    if args.expert_tensor_parallel_size != args.tensor_model_parallel_size:
        raise ConfigError(f"--expert-tensor-parallel-size {moe}")
    if not args.align_grad_reduce:
        raise ConfigError(f"--no-align-grad-reduce {NOT_SUPPORTED}")
    if args.num_distributed_optimizer_instances > 1:  # Megatron's partial distributed optimizer
        raise ConfigError(f"--num-distributed-optimizer-instances > 1 {NOT_SUPPORTED}")
    # Without virtual stages validation turns alignment off itself, as Megatron-LM does.
    if not args.align_param_gather and args.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(f"--no-align-param-gather {NOT_SUPPORTED}")


def _refuse_checkpoint_flags(args) -> None:
    if args.ckpt_format != "torch_dist":
        raise ConfigError(f"--ckpt-format {args.ckpt_format} {NOT_SUPPORTED} (torch_dist is)")
    strictness = args.dist_ckpt_strictness
    if strictness in _STRICTNESS_REFUSED:
        # The other values agree with the loader for matching checkpoints (training/checkpointing.py).
        raise ConfigError(f"--dist-ckpt-strictness {strictness} {NOT_SUPPORTED} "
                          f"({_STRICTNESS_REFUSED[strictness]})")
    for dest in ("non_persistent_save_interval", "non_persistent_ckpt_type", "non_persistent_global_ckpt_dir",
                 "ckpt_convert_format", "ckpt_convert_save"):
        if getattr(args, dest) is not None:
            raise ConfigError(f"{_flag(dest)} {NOT_SUPPORTED}")

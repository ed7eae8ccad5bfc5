"""Checks a parsed command line and derives the sizes the rest of the code needs.

Megatron-LM validates with asserts spread over several files; here every impossible or
contradictory setting raises a one-line `ConfigError` that names the flags at fault. The domain
of each single numeric flag is a table in `ranges.py`; this file checks flags together. Derived
attributes keep Megatron's names because the argument dump (spec §3.1) prints them.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable

import torch

from megatron_lite.config.cuda_graph_flags import check_cuda_graph_flags
from megatron_lite.config.dpp_flags import check_dpp_flags
from megatron_lite.config.errors import ConfigError
from megatron_lite.config.errors import flag as _flag
from megatron_lite.config.megatron_flags import check_megatron_flags_early, check_megatron_flags_late
from megatron_lite.config.memory_flags import check_memory_flags
from megatron_lite.config.ranges import check_ranges, check_rotary_dims
from megatron_lite.distributed.nccl_config import load_nccl_comm_config
from megatron_lite.pipeline_parallel.layout import build_layout, virtual_stages_per_rank
from megatron_lite.pipeline_parallel.schedules import ScheduleError, check_schedule

# --cp-comm-type values (spec §9.2); Megatron's help spells all_gather as "allgather".
_CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")

# Which file flags each tokenizer family needs (spec §10 "Tokenizer types").
_TOKENIZER_NEEDS = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "BertWordPieceLowerCase": ("vocab_file",),
    "BertWordPieceCase": ("vocab_file",),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "GPTSentencePieceTokenizer": ("tokenizer_model",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "TikTokenizer": ("tokenizer_model",),
    "MultimodalTokenizer": ("tokenizer_model",),
    "SFTTokenizer": ("tokenizer_model",),
    "NullTokenizer": ("vocab_size",),
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_args(
    args: argparse.Namespace,
    world_size: int,
    *,
    cuda_available: bool | None = None,
    warn: Callable[[str], None] | None = None,
) -> argparse.Namespace:
    """Reject impossible settings and fill in derived values; mutates and returns `args`.

    `cuda_available` (default: `torch.cuda.is_available()`) resolves `--distributed-backend`;
    `warn` receives non-fatal notices (default: this module's logger).
    """
    warn = warn or logging.getLogger(__name__).warning
    _require(isinstance(world_size, int) and world_size >= 1, f"world size must be >= 1 (got {world_size})")
    check_megatron_flags_early(args, warn)
    check_dpp_flags(args, warn)
    _check_required(args)
    check_ranges(args)  # one flag at a time, before any rule that combines flags
    _derive_parallel_sizes(args, world_size)
    _check_model_shape(args)
    check_rotary_dims(args)
    _reject_unsupported(args)
    _check_context_parallel(args)
    _derive_batch_sizes(args)
    _derive_pipeline_layout(args)
    _derive_precision(args)
    _check_training_length(args)
    _check_recompute(args)
    _check_data_parallel(args, torch.cuda.is_available() if cuda_available is None else cuda_available)
    _check_data_and_tokenizer(args, warn)
    _check_checkpointing(args)
    check_memory_flags(args)
    check_cuda_graph_flags(args, torch.cuda.is_available() if cuda_available is None else cuda_available,
                           warn)
    check_megatron_flags_late(args)
    _load_nccl_config(args, warn)
    # Progress counters start at zero; a checkpoint load overwrites them (spec §4.5).
    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0
    args.skipped_train_samples = 0
    args.variable_seq_lengths = False
    if not hasattr(args, "padded_vocab_size"):
        args.padded_vocab_size = None  # computed once the tokenizer is built (spec §3.7)
    return args


def _load_nccl_config(args, warn) -> None:
    """--nccl-communicator-config-path, read and checked here so a bad file stops the run
    before any process group exists; args.nccl_comm_cfgs holds it by group token."""
    args.nccl_comm_cfgs = {}
    if args.nccl_communicator_config_path is None:
        return
    args.nccl_comm_cfgs = load_nccl_comm_config(args.nccl_communicator_config_path)
    if args.distributed_backend != "nccl":
        warn(f"--nccl-communicator-config-path has no effect with --distributed-backend "
             f"{args.distributed_backend}: its options are NCCL communicators'")


def _check_required(args) -> None:
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        value = getattr(args, dest)
        _require(value is not None, f"{_flag(dest)} is required")
        _require(value > 0, f"{_flag(dest)} must be positive (got {value})")


def _derive_parallel_sizes(args, world_size: int) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    cp = args.context_parallel_size
    for dest, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
        _require(value >= 1, f"{_flag(dest)} must be >= 1 (got {value})")
    model = tp * pp * cp
    _require(
        world_size % model == 0,
        f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp}) x "
        f"--context-parallel-size ({cp}) = {model} does not divide the world size ({world_size})",
    )
    args.world_size = world_size
    args.data_parallel_size = world_size // model  # spec §5.1
    args.transformer_pipeline_model_parallel_size = pp
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = tp
    hcp = args.hierarchical_context_parallel_sizes
    if hcp:
        _require(math.prod(hcp) == cp, f"--hierarchical-context-parallel-sizes ({' '.join(map(str, hcp))}) "
                 f"multiply to {math.prod(hcp)}, not --context-parallel-size ({cp})")
    k = args.num_distributed_optimizer_instances
    if k != 1:
        _require(args.use_distributed_optimizer,
                 "--num-distributed-optimizer-instances > 1 needs --use-distributed-optimizer")
        dp_cp = args.data_parallel_size * cp
        _require(k >= 1 and dp_cp % k == 0, f"--num-distributed-optimizer-instances ({k}) must divide "
                 f"data-parallel size x --context-parallel-size ({dp_cp})")


def _check_model_shape(args) -> None:
    h, n, tp = args.hidden_size, args.num_attention_heads, args.tensor_model_parallel_size
    _require(n % tp == 0,
             f"--num-attention-heads ({n}) must be divisible by --tensor-model-parallel-size ({tp})")
    if args.group_query_attention:
        g = args.num_query_groups
        _require(g is not None and g >= 1, f"--num-query-groups must be >= 1 (got {g})")
        _require(n % g == 0, f"--num-attention-heads ({n}) must be a multiple of --num-query-groups ({g})")
        # Each TP rank holds whole K/V groups (spec §12: "num_query_groups must be a multiple of TP").
        _require(g % tp == 0,
                 f"--num-query-groups ({g}) must be divisible by --tensor-model-parallel-size ({tp})")
    else:
        args.num_query_groups = n  # plain multi-head attention: one K/V head per query head
    if args.kv_channels is None:
        _require(h % n == 0, f"--hidden-size ({h}) must be divisible by --num-attention-heads ({n}) "
                 "unless --kv-channels is given")
        args.kv_channels = h // n
    if args.ffn_hidden_size is None:
        # spec §10: SwiGLU's two fc1 halves keep parameters near 4h, rounded down to a multiple of 64.
        args.ffn_hidden_size = int((4 * h * 2 / 3) / 64) * 64 if args.swiglu else 4 * h
    _require(not (args.swiglu and args.squared_relu), "--swiglu and --squared-relu are mutually exclusive")
    if args.use_rotary_position_embeddings:  # deprecated spelling of --position-embedding-type rope
        args.position_embedding_type = "rope"
    s, p = args.seq_length, args.max_position_embeddings
    if args.position_embedding_type == "learned_absolute":
        _require(p is not None, "--max-position-embeddings is required with --position-embedding-type "
                 "learned_absolute")
        _require(s <= p, f"--seq-length ({s}) must be <= --max-position-embeddings ({p}) with "
                 "--position-embedding-type learned_absolute")
    elif p is None:
        args.max_position_embeddings = s  # no table to size; keep the dump and checkpoint args meaningful
    args.add_position_embedding = args.position_embedding_type == "learned_absolute"
    if args.position_embedding_type != "rope":
        args.apply_rope_fusion = False
    # Megatron keeps these in sync: no bias anywhere means no fused bias-GeLU; bias everywhere
    # includes QKV.
    if args.add_bias_linear:
        args.add_qkv_bias = True
    else:
        args.bias_gelu_fusion = False
    if args.apply_query_key_layer_scaling:
        args.attention_softmax_in_fp32 = True


def _reject_unsupported(args) -> None:
    # Asking for a feature we do not implement is an error, never a silent fallback (DESIGN rule 6).
    _require(not args.use_megatron_fsdp, "--use-megatron-fsdp is not supported by megatron_lite "
             "(--use-torch-fsdp2 is)")
    if args.num_experts == 0:
        args.num_experts = None
    _require(args.num_experts is None, "--num-experts (mixture of experts) is not supported by megatron_lite")
    _require(args.expert_model_parallel_size == 1,
             "--expert-model-parallel-size > 1 (mixture of experts) is not supported by megatron_lite")
    for flag, on in (("--fp8-format", args.fp8 is not None), ("--wandb-project", bool(args.wandb_project)),
                     ("--log-energy", args.log_energy), ("--log-progress", args.log_progress),
                     ("--multiple-validation-sets", args.multiple_validation_sets)):
        _require(not on, f"{flag} is not supported by megatron_lite")
    _require(not (args.profile and args.use_pytorch_profiler and not args.tensorboard_dir),
             "--use-pytorch-profiler writes its trace to --tensorboard-dir; give one")
    _require(not args.profile or args.profile_step_end > args.profile_step_start,
             f"--profile-step-end ({args.profile_step_end}) must be after --profile-step-start "
             f"({args.profile_step_start})")
    pet = args.position_embedding_type
    _require(pet in ("learned_absolute", "rope", "none"),
             f"--position-embedding-type {pet} is not supported by megatron_lite "
             "(use learned_absolute, rope or none)")


def _check_context_parallel(args) -> None:
    cp, s = args.context_parallel_size, args.seq_length
    if cp > 1:
        # spec §9.1: the sequence is cut into 2*CP chunks for the load-balanced split.
        _require(s % (2 * cp) == 0, f"--seq-length ({s}) must be divisible by 2 x --context-parallel-size "
                 f"({2 * cp}) when --context-parallel-size > 1")
    types = ["all_gather" if t == "allgather" else t for t in args.cp_comm_type]
    for t in types:
        _require(t in _CP_COMM_TYPES, f"--cp-comm-type {t} is not one of {', '.join(_CP_COMM_TYPES)}")
    _require(len(types) in (1, args.num_layers), f"--cp-comm-type takes one value or one per layer "
             f"(--num-layers {args.num_layers}), got {len(types)}")
    args.cp_comm_type = types
    if "a2a+p2p" in types:
        _require(args.hierarchical_context_parallel_sizes is not None,
                 "--cp-comm-type a2a+p2p needs --hierarchical-context-parallel-sizes")
        _require(len(args.hierarchical_context_parallel_sizes) == 2, "--hierarchical-context-parallel-sizes "
                 "takes two sizes (all-to-all group, ring group) for --cp-comm-type a2a+p2p")
    if cp == 1:
        return
    _require(not getattr(args, "reset_attention_mask", False),
             "--reset-attention-mask is not available with --context-parallel-size > 1")
    hcp = args.hierarchical_context_parallel_sizes
    for t, size in (("a2a", cp), ("a2a+p2p", hcp[0] if hcp else cp)):
        if t in types:
            _check_all_to_all_heads(args, t, size)


def _check_all_to_all_heads(args, comm_type: str, size: int) -> None:
    """spec §9.2: the Ulysses all-to-all trades the sequence shard for a head shard, so each
    of `size` ranks needs whole query heads and whole (or replicated) K/V heads."""
    tp = args.tensor_model_parallel_size
    heads = args.num_attention_heads // tp
    _require(heads % size == 0, f"--cp-comm-type {comm_type} needs --num-attention-heads / "
             f"--tensor-model-parallel-size ({heads}) divisible by its all-to-all size ({size})")
    if getattr(args, "group_query_attention", False) and args.num_query_groups:
        groups = args.num_query_groups // tp
        _require(groups % size == 0 or size % groups == 0, f"--cp-comm-type {comm_type} needs "
                 f"--num-query-groups / --tensor-model-parallel-size ({groups}) to divide or be divisible "
                 f"by its all-to-all size ({size})")


def _derive_batch_sizes(args) -> None:
    b, dp = args.micro_batch_size, args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = b * dp
    gbs = args.global_batch_size
    _require(gbs % (b * dp) == 0, f"--global-batch-size ({gbs}) must be divisible by "
             f"--micro-batch-size ({b}) x data-parallel size ({dp})")
    args.num_micro_batches = gbs // (b * dp)  # M (spec conventions)
    ramp = args.rampup_batch_size
    if ramp is not None:
        _require(len(ramp) == 3, "--rampup-batch-size takes 3 values: <start> <increment> <ramp-up samples>")
        start, incr, samples = ramp
        _require(start > 0 and incr > 0 and samples > 0, "--rampup-batch-size values must be positive")
        _require(start <= gbs and (gbs - start) % incr == 0, f"--rampup-batch-size start ({start}) must "
                 f"reach --global-batch-size ({gbs}) in steps of the increment ({incr})")
        _require(start % (b * dp) == 0 and incr % (b * dp) == 0,
                 f"--rampup-batch-size start ({start}) and increment ({incr}) must be multiples of "
                 f"--micro-batch-size ({b}) x data-parallel size ({dp})")
    if args.eval_micro_batch_size is None:
        args.eval_micro_batch_size = b
    if args.eval_global_batch_size is None:
        args.eval_global_batch_size = gbs
    eb, egbs = args.eval_micro_batch_size, args.eval_global_batch_size
    _require(eb > 0 and egbs % (eb * dp) == 0, f"--eval-global-batch-size ({egbs}) must be divisible by "
             f"--eval-micro-batch-size ({eb}) x data-parallel size ({dp})")


def _layout_conflicts(args) -> None:
    """--pipeline-model-parallel-layout places every layer itself (Megatron's rule)."""
    for dest in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                 "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        _require(getattr(args, dest) in (None, False), f"--pipeline-model-parallel-layout sets the "
                 f"stages itself: drop {_flag(dest)}")


def _derive_pipeline_layout(args) -> None:
    pp, layers = args.pipeline_model_parallel_size, args.num_layers
    per_vstage = args.num_layers_per_virtual_pipeline_stage
    n_vstages = args.num_virtual_stages_per_pipeline_rank
    _require(per_vstage is None or n_vstages is None, "--num-layers-per-virtual-pipeline-stage and "
             "--num-virtual-stages-per-pipeline-rank are mutually exclusive")
    for dest, value in (("num_layers_per_virtual_pipeline_stage", per_vstage),
                        ("num_virtual_stages_per_pipeline_rank", n_vstages)):
        _require(value is None or value >= 1, f"{_flag(dest)} must be >= 1 (got {value})")
    uneven = (args.decoder_first_pipeline_num_layers is not None
              or args.decoder_last_pipeline_num_layers is not None)
    _require(not (uneven and per_vstage is not None), "use --num-virtual-stages-per-pipeline-rank, not "
             "--num-layers-per-virtual-pipeline-stage, with --decoder-first/last-pipeline-num-layers")
    accounted = dict(account_for_embedding=args.account_for_embedding_in_pipeline_split,
                     account_for_loss=args.account_for_loss_in_pipeline_split)
    if args.pipeline_model_parallel_layout is not None:
        _layout_conflicts(args)
    try:  # pipeline_parallel/layout.py owns the split rules; its messages name the flags
        vpp = (n_vstages if per_vstage is None
               else virtual_stages_per_rank(layers, pp, per_vstage, **accounted))
        layout = build_layout(layers, pp, vpp, first_stage_layers=args.decoder_first_pipeline_num_layers,
                              last_stage_layers=args.decoder_last_pipeline_num_layers,
                              layout=args.pipeline_model_parallel_layout, **accounted)
        vpp = None if layout.vpp_size == 1 else layout.vpp_size  # spec §5.4: 1 is no interleaving
    except ValueError as e:
        raise ConfigError(str(e)) from None
    args.virtual_pipeline_model_parallel_size = vpp
    if args.microbatch_group_size_per_vp_stage is None:
        args.microbatch_group_size_per_vp_stage = pp  # spec §6.2: default N = PP
    # Megatron-LM's rule (model_parallel_config.py); our overlap already covers both phases.
    _require(args.overlap_p2p_comm or not args.overlap_p2p_comm_warmup_flush,
             "--overlap-p2p-communication-warmup-flush needs the p2p overlap (drop "
             "--no-overlap-p2p-communication)")
    if vpp is None:
        # Only the interleaved schedule overlaps p2p or aligns param gathers (Megatron does the same).
        args.overlap_p2p_comm = False
        args.align_param_gather = False
        return
    # spec §5.4: without p2p overlap two ranks would exchange several messages per batch.
    _require(args.overlap_p2p_comm or pp > 2, "the interleaved schedule with --no-overlap-p2p-communication "
             f"needs --pipeline-model-parallel-size > 2 (got {pp})")
    try:  # spec §6.2's group-size rules belong to the schedules
        check_schedule(pp, vpp, args.num_micro_batches, args.microbatch_group_size_per_vp_stage)
    except ScheduleError as e:
        raise ConfigError(str(e)) from None


def _derive_precision(args) -> None:
    _require(not (args.fp16 and args.bf16), "--fp16 and --bf16 are mutually exclusive")
    # spec §7.1: params_dtype follows the precision flag; main params/grads stay fp32.
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    if args.fp16 and not args.loss_scale:
        # With dynamic scaling an overflow is the scaler's signal, not an error (spec §7.1).
        args.check_for_nan_in_loss_and_grad = False
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = not args.grad_reduce_in_bf16
    _require(not args.fp32_residual_connection or args.fp16 or args.bf16,
             "--fp32-residual-connection needs --fp16 or --bf16")


def _check_training_length(args) -> None:
    iters, samples = args.train_iters, args.train_samples
    _require(iters is None or samples is None, "--train-iters and --train-samples are mutually exclusive")
    if not args.skip_train:
        _require(iters is not None or samples is not None,
                 "one of --train-iters and --train-samples is required (or pass --skip-train)")
        _require(args.lr is not None, "--lr is required for training (or pass --skip-train)")
    # Iteration- and sample-based schedules cannot be mixed (Megatron's "expected iteration-based ...").
    if iters is not None:
        for dest in ("lr_decay_samples", "lr_wsd_decay_samples", "rampup_batch_size"):
            _require(getattr(args, dest) is None, f"{_flag(dest)} needs --train-samples, not --train-iters")
        _require(args.lr_warmup_samples == 0, "--lr-warmup-samples needs --train-samples, not --train-iters")
    if samples is not None:
        for dest in ("lr_decay_iters", "lr_wsd_decay_iters"):
            _require(getattr(args, dest) is None, f"{_flag(dest)} needs --train-iters, not --train-samples")
        _require(args.lr_warmup_iters == 0, "--lr-warmup-iters needs --train-iters, not --train-samples")
    if args.lr_warmup_fraction is not None:
        _require(args.lr_warmup_iters == 0 and args.lr_warmup_samples == 0, "--lr-warmup-fraction and "
                 "--lr-warmup-iters / --lr-warmup-samples are mutually exclusive")
    if args.lr is not None:
        _require(args.min_lr <= args.lr, f"--min-lr ({args.min_lr}) must be <= --lr ({args.lr})")
    if args.weight_decay_incr_style == "constant":
        # Equal to --weight-decay is what a previous validation pass (or a checkpoint's args) holds.
        _require(args.start_weight_decay in (None, args.weight_decay)
                 and args.end_weight_decay in (None, args.weight_decay),
                 "--start-weight-decay / --end-weight-decay need --weight-decay-incr-style linear or cosine")
        args.start_weight_decay = args.weight_decay
        args.end_weight_decay = args.weight_decay
    else:
        _require(args.start_weight_decay is not None and args.end_weight_decay is not None,
                 f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay and "
                 "--end-weight-decay")


def _check_recompute(args) -> None:
    if getattr(args, "recompute_activations", False):
        args.recompute_granularity = "selective"
    if hasattr(args, "recompute_activations"):
        del args.recompute_activations  # Megatron drops the alias; the dump shows only the granularity
    granularity, method, n = args.recompute_granularity, args.recompute_method, args.recompute_num_layers
    if granularity == "full":
        _require(method is not None,
                 "--recompute-granularity full needs --recompute-method (uniform or block)")
        _require(n is not None, "--recompute-granularity full needs --recompute-num-layers")
        _require(1 <= n <= args.num_layers, f"--recompute-num-layers ({n}) must be between 1 and "
                 f"--num-layers ({args.num_layers})")
    else:
        shown = granularity or "unset"
        _require(method is None, f"--recompute-method needs --recompute-granularity full (it is {shown})")
        _require(n is None, f"--recompute-num-layers needs --recompute-granularity full (it is {shown})")
    if args.recompute_modules is None:
        args.recompute_modules = ["core_attn"]  # spec §10 default


def _check_data_parallel(args, cuda_available: bool) -> None:
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # nothing to shard over; keeps numerics identical to SP off
    _require(not args.tp_comm_overlap or args.sequence_parallel,
             "--tp-comm-overlap needs --sequence-parallel (and --tensor-model-parallel-size > 1)")
    if args.overlap_param_gather:
        # spec §8.3: the overlapped all-gather lives in the distributed optimizer's bucket chain.
        _require(args.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer")
        _require(args.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce")
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if cuda_available else "gloo"


def _check_data_and_tokenizer(args, warn: Callable[[str], None]) -> None:
    per_split = any(getattr(args, d) for d in ("train_data_path", "valid_data_path", "test_data_path"))
    _require(not (args.data_path and args.data_args_path),
             "--data-path and --data-args-path are mutually exclusive")
    _require(not (per_split and args.per_split_data_args_path),
             "--train/valid/test-data-path and --per-split-data-args-path are mutually exclusive")
    sources = [args.mock_data, bool(args.data_path or args.data_args_path),
               bool(per_split or args.per_split_data_args_path)]
    _require(sum(sources) <= 1, "give one data source: --mock-data, --data-path (or --data-args-path), or "
             "--train/valid/test-data-path (or --per-split-data-args-path)")
    if per_split or args.per_split_data_args_path:
        # spec §2.2: each listed dataset belongs wholly to its split.
        _require(args.split is None, "--split does not apply to --train/valid/test-data-path")
    if args.data_path and args.split is None:
        args.split = "969, 30, 1"  # spec §2.2 legacy default
        warn('--data-path without --split: using the legacy default split "969, 30, 1"')
    needs = _TOKENIZER_NEEDS.get(args.tokenizer_type, ())
    if args.mock_data:
        # Mock data only needs the vocabulary size, not the tokenizer files (spec §2.10).
        needs = tuple(dest for dest in needs if dest == "vocab_size")
    missing = [_flag(dest) for dest in needs if getattr(args, dest) is None]
    _require(not missing, f"--tokenizer-type {args.tokenizer_type} needs {' and '.join(missing)}")


def _check_checkpointing(args) -> None:
    if args.save is not None:
        _require(args.save_interval is not None, "--save needs --save-interval")
        # Found at startup, not at the first save after hours of training.
        _require(not os.path.exists(args.save) or os.path.isdir(args.save),
                 f"--save {args.save} is a file, not a directory")
    interval = args.save_interval
    retain = args.save_retain_interval
    if retain is not None:
        _require(interval is not None and retain > 0 and retain % interval == 0,
                 f"--save-retain-interval ({retain}) must be a positive multiple of --save-interval "
                 f"({interval})")

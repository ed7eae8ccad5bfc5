"""The command line of `pretrain_gpt.py` / `pretrain_llama.py`: Megatron-LM's flags, in groups.

Flag names, `dest` names and defaults follow Megatron-LM (spec §10) so that existing launch
scripts run unchanged and the argument dump (spec §3.1) prints Megatron's attribute names.
Derived values (data-parallel size, ffn width, ...) are computed later by
`validation.validate_args`; nothing here looks at the world size or the hardware.

The model-shape and optimisation groups live here; parallelism and I/O groups (data,
tokenizer, checkpoints, logging) live in `arguments_parallel.py` / `arguments_io.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from megatron_lite.config.accepted_as_is import ACCEPTED_AS_IS
from megatron_lite.config.arguments_io import (
    _add_checkpointing_args,
    _add_data_args,
    _add_logging_args,
    _add_tensorboard_args,
    _add_tokenizer_args,
    _add_validation_args,
)
from megatron_lite.config.arguments_parallel import _add_distributed_args, _add_moe_args
from megatron_lite.config.cuda_graph_flags import add_cuda_graph_args

ExtraArgsProvider = Callable[[argparse.ArgumentParser], "argparse.ArgumentParser | None"]


def _add_network_size_args(parser):
    group = parser.add_argument_group(title="network size")
    group.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers L.")
    group.add_argument("--decoder-num-layers", type=int, default=None,
                       help="Number of decoder layers: for a GPT the same as --num-layers.")
    group.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size h.")
    group.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="MLP hidden width. Default 4*h, or int(8h/3/64)*64 with --swiglu.")
    group.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    group.add_argument("--attention-backend", type=str, default="auto",
                       choices=["flash", "fused", "unfused", "local", "auto"],
                       help="Attention implementation; auto picks the fastest available.")
    group.add_argument("--kv-channels", type=int, default=None,
                       help="Per-head dimension. Default hidden-size / num-attention-heads.")
    group.add_argument("--group-query-attention", action="store_true",
                       help="Use grouped-query attention (fewer K/V heads than query heads).")
    group.add_argument("--num-query-groups", type=int, default=1,
                       help="Number of K/V head groups with --group-query-attention.")
    group.add_argument("--max-position-embeddings", type=int, default=None,
                       help="Size of the learned position-embedding table; must be >= --seq-length.")
    group.add_argument("--position-embedding-type", type=str, default="learned_absolute",
                       choices=["learned_absolute", "rope", "mrope", "yarn", "relative", "none"],
                       help="Position embedding type.")
    group.add_argument("--use-rotary-position-embeddings", action="store_true",
                       help="Deprecated: same as --position-embedding-type rope.")
    group.add_argument("--rotary-base", type=int, default=10000, help="RoPE base (theta).")
    group.add_argument("--rotary-percent", type=float, default=1.0,
                       help="Fraction of the head dimension that RoPE rotates.")
    group.add_argument("--rotary-interleaved", action="store_true",
                       help="Rotate interleaved (even, odd) pairs instead of the two halves.")
    group.add_argument("--rotary-seq-len-interpolation-factor", type=int, default=None,
                       help="Linear position interpolation factor for RoPE.")
    group.add_argument("--use-rope-scaling", action="store_true",
                       help="Apply Llama-3.x RoPE frequency scaling.")
    group.add_argument("--rope-scaling-factor", type=float, default=8.0,
                       help="Llama-3.x RoPE scaling factor.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="Pad the vocabulary to a multiple of this value times the TP size.")
    group.add_argument("--normalization", type=str, default="LayerNorm", choices=["LayerNorm", "RMSNorm"],
                       help="Normalization layer.")
    group.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of LayerNorm / RMSNorm.")
    group.add_argument("--apply-layernorm-1p", action="store_true",
                       help="Zero-centred LayerNorm gamma (weight stored as gamma - 1).")
    group.add_argument("--apply-residual-connection-post-layernorm", action="store_true",
                       help="Take the residual after the LayerNorm (original BERT ordering).")
    group.add_argument("--openai-gelu", action="store_true", help=ACCEPTED_AS_IS["openai_gelu"])
    group.add_argument("--squared-relu", action="store_true", help="Use squared ReLU instead of GeLU.")
    group.add_argument("--swiglu", action="store_true", help="Gated SiLU MLP (SwiGLU); fc1 is doubled.")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                       help="Use a separate output layer instead of the input embedding.")
    group.add_argument("--qk-layernorm", action="store_true", help="Normalize queries and keys per head.")
    group.add_argument("--spec", type=str, nargs="*", default=None,
                       help="Module and function returning a Megatron-LM layer spec (refused: megatron_lite "
                       "builds its layers from the model flags).")
    return parser


def _add_regularization_args(parser):
    group = parser.add_argument_group(title="regularization")
    group.add_argument("--attention-dropout", type=float, default=0.1,
                       help="Dropout on attention probabilities.")
    group.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout on the residual branches.")
    group.add_argument("--weight-decay", type=float, default=0.01, help="Decoupled weight decay coefficient.")
    group.add_argument("--start-weight-decay", type=float, default=None,
                       help="Weight decay at the start of a non-constant schedule.")
    group.add_argument("--end-weight-decay", type=float, default=None,
                       help="Weight decay at the end of a non-constant schedule.")
    group.add_argument("--weight-decay-incr-style", type=str, default="constant",
                       choices=["constant", "linear", "cosine"], help="Weight decay schedule.")
    group.add_argument("--clip-grad", type=float, default=1.0,
                       help="Clip gradients to this global L2 norm (0 disables).")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-08, help="Adam epsilon.")
    group.add_argument("--sgd-momentum", type=float, default=0.9, help="SGD momentum.")
    group.add_argument("--label-smoothing", type=float, default=0.0,
                       help="Label smoothing of the language-model cross entropy.")
    return parser


def _add_training_args(parser):
    group = parser.add_argument_group(title="training")
    group.add_argument("--micro-batch-size", type=int, default=None,
                       help="Samples per micro-batch per data-parallel replica (b).")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="Samples per iteration over all replicas (B). Default b * DP.")
    group.add_argument("--rampup-batch-size", nargs="*", type=int, default=None,
                       help="Batch-size ramp: <start> <increment> <ramp-up samples>.")
    group.add_argument("--train-iters", type=int, default=None, help="Total training iterations.")
    group.add_argument("--train-samples", type=int, default=None, help="Total training samples.")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="Checkpoint and exit when the iteration is divisible by this value.")
    group.add_argument("--exit-duration-in-mins", type=int, default=None,
                       help="Checkpoint and exit after this many minutes.")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="Checkpoint and exit on SIGTERM.")
    group.add_argument("--recompute-activations", action="store_true",
                       help="Same as --recompute-granularity selective.")
    group.add_argument("--recompute-granularity", type=str, default=None, choices=["full", "selective"],
                       help="Recompute whole layers (full) or submodules (selective).")
    group.add_argument("--recompute-method", type=str, default=None, choices=["uniform", "block"],
                       help="Full recompute: each chunk of N layers (uniform) or N layers per stage (block).")
    group.add_argument("--recompute-num-layers", type=int, default=None,
                       help="N for --recompute-method.")
    group.add_argument("--recompute-modules", nargs="*", type=str, default=None,
                       choices=["core_attn", "mlp", "layernorm", "moe_act", "moe", "shared_experts",
                                "mla_up_proj"],
                       help="Submodules recomputed with selective granularity (default core_attn).")
    group.add_argument("--distribute-saved-activations", action="store_true",
                       help="Shard checkpointed layer inputs over the TP group (full recompute only).")
    group.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", default=True,
                       help="Check loss and gradients for NaN (the default).")
    group.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                       dest="check_for_nan_in_loss_and_grad", help="Skip NaN checks of loss and grads.")
    group.add_argument("--calculate-per-token-loss", action="store_true",
                       help="Normalize the loss by the global number of unmasked tokens.")
    group.add_argument("--empty-unused-memory-level", type=int, default=0, choices=[0, 1, 2],
                       help="Call torch.cuda.empty_cache() each iteration: 0 never, 1 moderate, 2 often.")
    group.add_argument("--use-cpu-initialization", action="store_true", default=None,
                       help="Draw the initial weights on the CPU, then copy them to the device: the same "
                       "--seed then gives bit-identical weights on CPU and GPU.")
    group.add_argument("--deterministic-mode", action="store_true",
                       help="Prefer deterministic kernels (slower).")
    group.add_argument("--manual-gc", action="store_true",
                       help="Disable automatic garbage collection; collect at fixed steps.")
    group.add_argument("--manual-gc-interval", type=int, default=0,
                       help="Steps between manual garbage collections (0: only around evaluation).")
    group.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                       help="With --manual-gc, do not collect around evaluation.")
    group.add_argument("--profile", action="store_true", help="Enable profiling (nsys or torch profiler).")
    group.add_argument("--use-pytorch-profiler", action="store_true", help="Profile with torch.profiler.")
    group.add_argument("--profile-step-start", type=int, default=10, help="First profiled step.")
    group.add_argument("--profile-step-end", type=int, default=12, help="Step at which profiling stops.")
    group.add_argument("--profile-ranks", nargs="+", type=int, default=[0], help="Global ranks to profile.")
    _add_training_kernel_and_optimizer_args(group)
    return parser


def _add_training_kernel_and_optimizer_args(group) -> None:
    """The rest of Megatron's training group: fusions, optimizer choice and offload, layer
    implementation, batch-size schedule, weight-hash check and re-run engine."""
    # Fusion switches (spec §10): on by default, each with a --no-* flag.
    group.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion",
                       help=ACCEPTED_AS_IS["masked_softmax_fusion"])
    group.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion",
                       help=ACCEPTED_AS_IS["bias_gelu_fusion"])
    group.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion",
                       help="Disable the fused bias+SwiGLU kernel.")
    group.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion",
                       help=ACCEPTED_AS_IS["bias_dropout_fusion"])
    group.add_argument("--no-rope-fusion", action="store_false", dest="apply_rope_fusion",
                       help="Disable the fused RoPE kernel.")
    group.add_argument("--no-gradient-accumulation-fusion", action="store_false",
                       dest="gradient_accumulation_fusion",
                       help="Disable accumulating weight gradients directly into main_grad.")
    group.add_argument("--no-persist-layer-norm", action="store_true",
                       help="Norms by PyTorch (F.layer_norm; RMSNorm uncompiled) instead of the Triton "
                       "kernels of megatron_lite/fused.")
    group.add_argument("--cross-entropy-loss-fusion", action="store_true",
                       help="Use the fused (vocab-parallel) cross-entropy kernel.")
    group.add_argument("--cross-entropy-fusion-impl", type=str, default="native", choices=["native", "te"],
                       help="Implementation of the fused cross entropy.")
    group.add_argument("--use-flash-attn", action="store_true", help=ACCEPTED_AS_IS["use_flash_attn"])
    group.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                       help="No biases in linear layers.")
    group.add_argument("--add-qkv-bias", action="store_true", help="Bias only on the QKV projection.")
    group.add_argument("--optimizer", type=str, default="adam", choices=["adam", "sgd"], help="Optimizer.")
    group.add_argument("--optimizer-cpu-offload", action="store_true",
                       help="Keep part of the fp32 main params and optimizer state in host memory and step "
                       "it on the CPU (optimizer/cpu_offload.py).")
    group.add_argument("--optimizer-offload-fraction", type=float, default=1.0,
                       help="Share of the main-param elements --optimizer-cpu-offload keeps on the host.")
    group.add_argument("--use-torch-optimizer-for-cpu-offload", action="store_true",
                       help="torch.optim on both sides of the offloaded step (megatron_lite always does).")
    group.add_argument("--overlap-cpu-optimizer-d2h-h2d", action="store_true",
                       help="Overlap the offloaded step's device-host copies with the CPU step.")
    group.add_argument("--dataloader-type", type=str, default="single",
                       choices=["single", "cyclic", "external"], help="Data sampler type.")
    group.add_argument("--transformer-impl", type=str, default="transformer_engine",
                       choices=["local", "transformer_engine"],
                       help="Megatron-LM's layer implementation: transformer_engine attends with the kernel "
                       "of --attention-backend; local attends unfused (--attention-backend auto becomes "
                       "local).")
    # Megatron-LM's training and rerun-state-machine groups (spec §10 lists neither; HEAD has both).
    group.add_argument("--step-batch-size-schedule", type=str, default=None,
                       help="Step-wise batch-size schedule \"THRESHOLD:BS ...\" (refused: use "
                       "--rampup-batch-size).")
    group.add_argument("--check-weight-hash-across-dp-replicas-interval", type=int, default=None,
                       help="Every N iterations (and before training) check that the weights of all "
                       "data-parallel replicas hash equal; stop with an error if not.")
    group.add_argument("--rerun-mode", type=str, default="disabled",
                       choices=["disabled", "validate_results", "report_stats"],
                       help="Megatron-LM's re-run engine: only disabled is supported (Megatron-LM's default "
                       "is validate_results); a NaN loss stops the run with an error, without re-running "
                       "the step.")
    add_cuda_graph_args(group)


def _add_inference_args(parser):
    group = parser.add_argument_group(title="inference")
    group.add_argument("--max-tokens-to-oom", type=int, default=12000,
                       help="Megatron-LM's inference server token limit (refused unless left at its default: "
                       "megatron_lite has no inference server).")
    return parser


def _add_initialization_args(parser):
    group = parser.add_argument_group(title="initialization")
    # Deprecated in Megatron-LM itself ("Now ignored and mcore models are the default"); used by
    # most of its launch scripts, so accepted exactly as Megatron accepts it.
    group.add_argument("--use-mcore-models", action="store_true", dest="deprecated_use_mcore_models",
                       help=ACCEPTED_AS_IS["deprecated_use_mcore_models"])
    group.add_argument("--seed", type=int, default=1234,
                       help="Random seed for python, numpy, torch and CUDA.")
    group.add_argument("--data-parallel-random-init", action="store_true",
                       help="Initialize parameters differently on each data-parallel rank.")
    group.add_argument("--init-method-std", type=float, default=0.02,
                       help="Std of the normal init; output projections use std/sqrt(2L).")
    group.add_argument("--embedding-init-method-std", type=float, default=None,
                       help="Std of the embedding init (default: --init-method-std).")
    return parser


def _add_learning_rate_args(parser):
    group = parser.add_argument_group(title="learning rate")
    group.add_argument("--lr", type=float, default=None, help="Peak learning rate.")
    group.add_argument("--lr-decay-style", type=str, default="linear",
                       choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                       help="Learning-rate decay function.")
    group.add_argument("--lr-wsd-decay-style", type=str, default="exponential",
                       choices=["exponential", "linear", "cosine", "minus_sqrt"],
                       help="Annealing shape of the WSD schedule.")
    group.add_argument("--lr-decay-iters", type=int, default=None,
                       help="Iterations to decay over (default --train-iters).")
    group.add_argument("--lr-decay-samples", type=int, default=None,
                       help="Samples to decay over (default --train-samples).")
    group.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                       help="Iterations of the WSD annealing phase.")
    group.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                       help="Samples of the WSD annealing phase.")
    group.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="Warmup as a fraction of the decay steps.")
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warmup iterations.")
    group.add_argument("--lr-warmup-samples", type=int, default=0, help="Linear warmup samples.")
    group.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at step 0.")
    group.add_argument("--min-lr", type=float, default=0.0, help="Learning-rate floor.")
    group.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                       action="store_true", dest="override_opt_param_scheduler",
                       help="On resume, take scheduler settings from the command line.")
    group.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                       action="store_true", dest="use_checkpoint_opt_param_scheduler",
                       help="On resume, take scheduler settings from the checkpoint.")
    group.add_argument("--decoupled-lr", type=float, default=None,
                       help="Separate learning rate for the input embedding and output layer.")
    group.add_argument("--decoupled-min-lr", type=float, default=None,
                       help="Minimum of --decoupled-lr.")
    return parser


def _add_mixed_precision_args(parser):
    group = parser.add_argument_group(title="mixed precision")
    group.add_argument("--fp16", action="store_true", help="Train with fp16 parameters and loss scaling.")
    group.add_argument("--bf16", action="store_true", help="Train with bf16 parameters.")
    group.add_argument("--grad-reduce-in-bf16", action="store_true",
                       help="Reduce gradients in bf16 instead of fp32.")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="Constant loss scale; None means dynamic scaling with --fp16.")
    group.add_argument("--initial-loss-scale", type=float, default=2**32, help="Initial dynamic loss scale.")
    group.add_argument("--min-loss-scale", type=float, default=1.0, help="Minimum dynamic loss scale.")
    group.add_argument("--loss-scale-window", type=float, default=1000,
                       help="Clean steps before the dynamic loss scale doubles.")
    group.add_argument("--hysteresis", type=int, default=2,
                       help="Overflows tolerated before the dynamic loss scale halves.")
    group.add_argument("--fp32-residual-connection", action="store_true",
                       help="Keep the residual stream in fp32.")
    group.add_argument("--apply-query-key-layer-scaling", action="store_true",
                       help="Scale QK^T by 1/layer-number (implies --attention-softmax-in-fp32).")
    group.add_argument("--attention-softmax-in-fp32", action="store_true",
                       help="Compute attention softmax in fp32.")
    group.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                       help="Accumulate and reduce gradients in fp32 (forced on with --bf16).")
    group.add_argument("--fp16-lm-cross-entropy", action="store_true",
                       help="Compute the unreduced LM cross entropy in fp16.")
    group.add_argument("--fp8-format", type=str, default=None, choices=["e4m3", "hybrid"], dest="fp8",
                       help="FP8 format (Transformer Engine).")
    group.add_argument("--fp8-recipe", type=str, default="delayed",
                       choices=["tensorwise", "delayed", "mxfp8", "blockwise"], help="FP8 scaling recipe.")
    return parser


# Group order follows Megatron's `add_megatron_arguments` so `--help` reads the same.
_GROUPS = (
    _add_network_size_args,
    _add_regularization_args,
    _add_training_args,
    _add_initialization_args,
    _add_learning_rate_args,
    _add_checkpointing_args,
    _add_mixed_precision_args,
    _add_distributed_args,
    _add_validation_args,
    _add_data_args,
    _add_tokenizer_args,
    _add_moe_args,
    _add_logging_args,
    _add_tensorboard_args,
    _add_inference_args,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported in one `error:` line: its default prints
    the whole usage first, some 200 lines here, above the line that names the flag."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(extra_args_provider: ExtraArgsProvider | None = None) -> argparse.ArgumentParser:
    """A fresh parser with every megatron_lite flag (plus `extra_args_provider`'s, if given)."""
    parser = _Parser(
        prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None,
        description="megatron_lite arguments (Megatron-LM compatible)",
        # Abbreviations would let a typo of one flag silently set another (spec §10 names only).
        allow_abbrev=False,
    )
    for add_group in _GROUPS:
        add_group(parser)
    if extra_args_provider is not None:
        # Megatron's providers return the parser; tolerate ones that only mutate it.
        parser = extra_args_provider(parser) or parser
    return parser


def parse_args(
    argv: Sequence[str] | None = None,
    extra_args_provider: ExtraArgsProvider | None = None,
    defaults: dict | None = None,
    ignore_unknown_args: bool = False,
) -> argparse.Namespace:
    """Parse `argv` (default `sys.argv[1:]`).

    `defaults` replaces parser defaults before parsing, so the command line still wins: this
    is how `pretrain_llama.py` turns on RMSNorm/SwiGLU/RoPE and `pretrain_gpt.py` picks
    `GPT2BPETokenizer`. Unknown flags exit with one `error:` line (status 2) naming them,
    unless `ignore_unknown_args`.
    """
    parser = build_parser(extra_args_provider)
    if defaults:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"defaults name no argument: {', '.join(unknown)}")
        parser.set_defaults(**defaults)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    return args

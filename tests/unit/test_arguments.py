"""Command line (Megatron flag names/defaults), validation errors, derived sizes, argument dump.

Regenerate the flag snapshot after adding a flag on purpose:
    python -m tests.unit.test_arguments --update-snapshot
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite.config.arguments import build_parser, parse_args
from megatron_lite.config.startup_lines import (
    format_args_dump,
    pad_vocab_size,
    padded_vocab_line,
    world_size_line,
)
from megatron_lite.config.validation import ConfigError, validate_args

SNAPSHOT = Path(__file__).parent / "data" / "flags_snapshot.txt"
REGENERATE = "python -m tests.unit.test_arguments --update-snapshot"

# A tiny valid GPT: 4 layers, h=64, 4 heads, S=32, b=2.
BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 64 --micro-batch-size 2 --mock-data "
        "--tokenizer-type NullTokenizer --vocab-size 128")
TRAIN = "--train-iters 10 --lr 1e-3"


def make(extra: str = "", world: int = 1, train: str = TRAIN, defaults=None, **kwargs):
    """Parse BASE + train + extra (later flags win) and validate for `world` ranks."""
    args = parse_args(f"{BASE} {train} {extra}".split(), defaults=defaults)
    return validate_args(args, world, cuda_available=False, **kwargs)


def current_flags() -> list[str]:
    return sorted(opt for action in build_parser()._actions for opt in action.option_strings)


# ---------------------------------------------------------------------------------------------
# (1) flag set snapshot


def test_flag_snapshot():
    snapshot = SNAPSHOT.read_text().split()
    current = current_flags()
    vanished = sorted(set(snapshot) - set(current))
    added = sorted(set(current) - set(snapshot))
    assert not vanished, f"flags vanished (breaks users' Megatron command lines): {vanished}"
    assert not added, f"new flags not in {SNAPSHOT.name}: {added}; if intended, run: {REGENERATE}"


SPEC_SECTION_10_FLAGS = """
--num-layers --hidden-size --num-attention-heads --ffn-hidden-size --kv-channels --group-query-attention
--num-query-groups --seq-length --max-position-embeddings --position-embedding-type --rotary-base
--rotary-percent --rotary-interleaved --rotary-seq-len-interpolation-factor --normalization --norm-epsilon
--swiglu --squared-relu --openai-gelu --disable-bias-linear --add-qkv-bias --qk-layernorm
--untie-embeddings-and-output-weights --make-vocab-size-divisible-by --attention-dropout --hidden-dropout
--init-method-std --apply-layernorm-1p --transformer-impl --attention-backend --use-flash-attn --spec
--micro-batch-size --global-batch-size --rampup-batch-size --train-iters --train-samples --exit-interval
--exit-duration-in-mins --exit-signal-handler --seed --data-parallel-random-init --optimizer --lr --min-lr
--lr-decay-style --lr-decay-iters --lr-decay-samples --lr-warmup-iters --lr-warmup-samples
--lr-warmup-fraction --lr-warmup-init --lr-wsd-decay-style --lr-wsd-decay-iters --weight-decay
--start-weight-decay --end-weight-decay --weight-decay-incr-style --adam-beta1 --adam-beta2 --adam-eps
--sgd-momentum --clip-grad --override-opt_param-scheduler --use-checkpoint-opt_param-scheduler
--decoupled-lr --fp16 --bf16 --loss-scale --initial-loss-scale --min-loss-scale --loss-scale-window
--hysteresis --accumulate-allreduce-grads-in-fp32 --grad-reduce-in-bf16 --attention-softmax-in-fp32
--apply-query-key-layer-scaling --fp8-format --fp8-recipe --tensor-model-parallel-size
--pipeline-model-parallel-size --num-layers-per-virtual-pipeline-stage --num-virtual-stages-per-pipeline-rank
--microbatch-group-size-per-virtual-pipeline-stage --context-parallel-size --cp-comm-type
--hierarchical-context-parallel-sizes --sequence-parallel --expert-model-parallel-size
--expert-tensor-parallel-size --num-experts --moe-router-topk --use-distributed-optimizer
--overlap-grad-reduce --overlap-param-gather --ddp-bucket-size --ddp-average-in-collective
--tp-comm-overlap --no-overlap-p2p-communication --use-tp-pp-dp-mapping
--num-distributed-optimizer-instances --distributed-backend --distributed-timeout-minutes
--use-megatron-fsdp --use-torch-fsdp2 --recompute-activations --recompute-granularity --recompute-method
--recompute-num-layers --recompute-modules --distribute-saved-activations --empty-unused-memory-level
--data-path --split --train-data-path --valid-data-path --test-data-path --data-args-path
--per-split-data-args-path --mock-data --data-cache-path --num-workers --dataloader-type
--no-mmap-bin-files --reset-position-ids --reset-attention-mask --eod-mask-loss --mid-level-dataset-surplus
--tokenizer-type --vocab-file --merge-file --tokenizer-model --vocab-size --tiktoken-pattern
--tiktoken-num-special-tokens --tokenizer-special-tokens --eval-interval --eval-iters
--eval-global-batch-size --eval-micro-batch-size --skip-train --full-validation --multiple-validation-sets
--log-interval --log-throughput --log-params-norm --log-num-zeros-in-grad --timing-log-level
--timing-log-option --log-memory-interval --tensorboard-dir --tensorboard-log-interval
--tensorboard-queue-size --log-timers-to-tensorboard --log-validation-ppl-to-tensorboard
--log-memory-to-tensorboard --log-world-size-to-tensorboard --no-log-loss-scale-to-tensorboard
--wandb-project --wandb-exp-name --wandb-save-dir --log-progress --save --load --save-interval --ckpt-format
--no-save-optim --no-save-rng --no-load-optim --no-load-rng --finetune --pretrained-checkpoint
--use-checkpoint-args --exit-on-missing-checkpoint --ckpt-step --async-save --no-ckpt-fully-parallel-save
--ckpt-fully-parallel-load --dist-ckpt-optim-fully-reshardable --auto-detect-ckpt-format
--ckpt-convert-format --ckpt-convert-save --dist-ckpt-strictness --no-masked-softmax-fusion
--no-bias-gelu-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion
--no-gradient-accumulation-fusion --no-persist-layer-norm --cross-entropy-loss-fusion
--cross-entropy-fusion-impl
--decoder-first-pipeline-num-layers --decoder-last-pipeline-num-layers --virtual-pipeline-model-parallel-size
--account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split --calculate-per-token-loss
--check-for-nan-in-loss-and-grad --no-check-for-nan-in-loss-and-grad --use-rope-scaling
--rope-scaling-factor --label-smoothing --pipeline-trace --save-retain-interval --override-ckpt-iteration
""".split()


def test_spec_flags_present():
    missing = sorted(set(SPEC_SECTION_10_FLAGS) - set(current_flags()))
    assert not missing, f"flags of spec §10/§2-§9 missing from the parser: {missing}"


# ---------------------------------------------------------------------------------------------
# (2) Megatron defaults (spec §10 tables)

MEGATRON_DEFAULTS = {
    "ffn_hidden_size": None, "kv_channels": None, "group_query_attention": False, "num_query_groups": 1,
    "position_embedding_type": "learned_absolute", "rotary_base": 10000, "rotary_percent": 1.0,
    "rotary_interleaved": False, "rotary_seq_len_interpolation_factor": None, "use_rope_scaling": False,
    "rope_scaling_factor": 8.0, "normalization": "LayerNorm", "norm_epsilon": 1e-5, "swiglu": False,
    "add_bias_linear": True, "add_qkv_bias": False, "qk_layernorm": False,
    "untie_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 128,
    "attention_dropout": 0.1, "hidden_dropout": 0.1, "init_method_std": 0.02, "apply_layernorm_1p": False,
    "transformer_impl": "transformer_engine", "attention_backend": "auto", "spec": None,
    "global_batch_size": None, "rampup_batch_size": None, "train_iters": None, "train_samples": None,
    "exit_interval": None, "exit_duration_in_mins": None, "seed": 1234, "optimizer": "adam", "lr": None,
    "min_lr": 0.0, "lr_decay_style": "linear", "lr_decay_iters": None, "lr_decay_samples": None,
    "lr_warmup_iters": 0, "lr_warmup_samples": 0, "lr_warmup_fraction": None, "lr_warmup_init": 0.0,
    "lr_wsd_decay_style": "exponential", "lr_wsd_decay_iters": None, "weight_decay": 0.01,
    "start_weight_decay": None, "end_weight_decay": None, "weight_decay_incr_style": "constant",
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "sgd_momentum": 0.9, "clip_grad": 1.0,
    "decoupled_lr": None, "label_smoothing": 0.0,
    "fp16": False, "bf16": False, "loss_scale": None, "initial_loss_scale": 2.0**32, "min_loss_scale": 1.0,
    "loss_scale_window": 1000, "hysteresis": 2, "accumulate_allreduce_grads_in_fp32": False,
    "grad_reduce_in_bf16": False, "fp8": None, "fp8_recipe": "delayed",
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    "num_layers_per_virtual_pipeline_stage": None, "num_virtual_stages_per_pipeline_rank": None,
    "microbatch_group_size_per_vp_stage": None, "context_parallel_size": 1, "cp_comm_type": ["p2p"],
    "hierarchical_context_parallel_sizes": None, "sequence_parallel": False,
    "expert_model_parallel_size": 1, "expert_tensor_parallel_size": None, "num_experts": None,
    "moe_router_topk": 2, "use_distributed_optimizer": False, "overlap_grad_reduce": False,
    "overlap_param_gather": False, "ddp_bucket_size": None, "ddp_average_in_collective": False,
    "tp_comm_overlap": False, "overlap_p2p_comm": True, "num_distributed_optimizer_instances": 1,
    "distributed_backend": None, "distributed_timeout_minutes": 10,
    "decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
    "recompute_activations": False, "recompute_granularity": None, "recompute_method": None,
    "recompute_num_layers": None, "distribute_saved_activations": False, "empty_unused_memory_level": 0,
    "check_for_nan_in_loss_and_grad": True, "calculate_per_token_loss": False,
    "data_path": None, "split": None, "mock_data": False, "data_cache_path": None, "num_workers": 2,
    "dataloader_type": "single", "mmap_bin_files": True, "reset_position_ids": False,
    "reset_attention_mask": False, "eod_mask_loss": False, "mid_level_dataset_surplus": 0.005,
    "tokenizer_type": None, "vocab_file": None, "merge_file": None, "tokenizer_model": None,
    "vocab_size": None, "tiktoken_num_special_tokens": 1000, "padded_vocab_size": None,
    "eval_interval": 1000, "eval_iters": 100, "skip_train": False, "log_interval": 100,
    "log_throughput": False, "timing_log_level": 0, "timing_log_option": "minmax",
    "log_memory_interval": None, "tensorboard_dir": None, "tensorboard_log_interval": 1,
    "tensorboard_queue_size": 1000, "log_loss_scale_to_tensorboard": True, "wandb_project": "",
    "save": None, "load": None, "save_interval": None, "ckpt_format": "torch_dist", "no_save_optim": None,
    "no_load_optim": None, "no_load_rng": None, "finetune": False, "ckpt_step": None, "async_save": None,
    "ckpt_fully_parallel_save": True, "ckpt_fully_parallel_load": False,
    "dist_ckpt_strictness": "assume_ok_unexpected", "masked_softmax_fusion": True, "bias_gelu_fusion": True,
    "bias_swiglu_fusion": True, "bias_dropout_fusion": True, "apply_rope_fusion": True,
    "gradient_accumulation_fusion": True, "no_persist_layer_norm": False, "cross_entropy_loss_fusion": False,
    "cross_entropy_fusion_impl": "native", "pipeline_trace": False,
}


def test_megatron_defaults():
    args = parse_args([])
    wrong = {k: (getattr(args, k), v) for k, v in MEGATRON_DEFAULTS.items() if getattr(args, k) != v}
    assert not wrong, f"(got, expected): {wrong}"


def test_defaults_override_parser_defaults_but_command_line_wins():
    llama = {"normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope",
             "untie_embeddings_and_output_weights": True, "add_bias_linear": False,
             "tokenizer_type": "GPT2BPETokenizer"}
    args = parse_args(["--tokenizer-type", "NullTokenizer"], defaults=llama)
    assert (args.normalization, args.swiglu, args.position_embedding_type) == ("RMSNorm", True, "rope")
    assert args.untie_embeddings_and_output_weights and not args.add_bias_linear
    assert args.tokenizer_type == "NullTokenizer"
    assert parse_args(["--normalization", "LayerNorm"], defaults=llama).normalization == "LayerNorm"
    with pytest.raises(ValueError, match="no_such_arg"):
        parse_args([], defaults={"no_such_arg": 1})


def test_extra_args_provider():
    def provider(parser):
        parser.add_argument_group(title="mine").add_argument("--my-flag", type=int, default=3)
        return parser
    assert parse_args(["--my-flag", "5"], extra_args_provider=provider).my_flag == 5


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# (4) derived values


def test_parallel_and_batch_sizes():
    args = make("--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --global-batch-size 16", 8)
    assert (args.world_size, args.data_parallel_size, args.num_micro_batches) == (8, 2, 4)
    assert args.microbatch_group_size_per_vp_stage == 2  # default N = PP (spec §6.2)
    assert args.expert_tensor_parallel_size == 2
    args = make("--context-parallel-size 2", 8)
    assert (args.data_parallel_size, args.global_batch_size, args.num_micro_batches) == (4, 8, 1)
    assert (args.eval_micro_batch_size, args.eval_global_batch_size) == (2, 8)


def test_model_shape_derivations():
    args = make()
    assert (args.ffn_hidden_size, args.kv_channels, args.num_query_groups) == (256, 16, 4)
    assert args.add_position_embedding and args.add_qkv_bias and not args.apply_rope_fusion
    # Megatron's SwiGLU width: int(8h/3/64)*64; h=4096 gives 10880 (Llama-2's 11008 is passed explicitly).
    big = "--hidden-size 4096 --num-attention-heads 32 --swiglu"
    assert make(big).ffn_hidden_size == 10880
    assert make(big + " --ffn-hidden-size 11008").ffn_hidden_size == 11008
    args = make("--hidden-size 66 --kv-channels 16 --group-query-attention --num-query-groups 2")
    assert (args.kv_channels, args.num_query_groups, args.ffn_hidden_size) == (16, 2, 264)
    args = make("--position-embedding-type rope --disable-bias-linear --seq-length 128")
    assert not args.add_position_embedding and args.apply_rope_fusion
    assert not args.add_bias_linear and not args.add_qkv_bias and not args.bias_gelu_fusion
    args = make("--use-rotary-position-embeddings", train=TRAIN)
    assert args.position_embedding_type == "rope"


def test_precision_derivations():
    assert make().params_dtype is torch.float32
    args = make("--bf16")
    assert args.params_dtype is torch.bfloat16 and args.accumulate_allreduce_grads_in_fp32
    assert not make("--bf16 --grad-reduce-in-bf16").accumulate_allreduce_grads_in_fp32
    args = make("--fp16")
    assert args.params_dtype is torch.float16 and not args.check_for_nan_in_loss_and_grad
    assert make("--fp16 --loss-scale 1024").check_for_nan_in_loss_and_grad


def test_virtual_pipeline_derivations():
    pp4 = "--num-layers 16 --pipeline-model-parallel-size 4 --global-batch-size 16"
    vpp = "virtual_pipeline_model_parallel_size"
    assert getattr(make(pp4 + " --num-layers-per-virtual-pipeline-stage 1", 4), vpp) == 4
    assert getattr(make(pp4 + " --num-virtual-stages-per-pipeline-rank 1", 4), vpp) is None
    args = make(pp4 + " --virtual-pipeline-model-parallel-size 2", 4)
    assert args.virtual_pipeline_model_parallel_size == 2 and args.overlap_p2p_comm
    args = make(pp4, 4)
    assert args.virtual_pipeline_model_parallel_size is None and not args.overlap_p2p_comm
    # Megatron-LM's rule for the warm-up/flush overlap, which ours always includes.
    interleaved = pp4 + " --virtual-pipeline-model-parallel-size 2 --overlap-p2p-communication-warmup-flush"
    assert make(interleaved, 4).overlap_p2p_comm
    with pytest.raises(ConfigError, match=r"^--overlap-p2p-communication-warmup-flush needs the p2p overlap"):
        make(interleaved + " --no-overlap-p2p-communication", 4)
    # spec §6.2: N = M allows any M >= PP; M mod N >= PP is also fine.
    pp2 = "--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
    make(pp2 + "--micro-batch-size 1 --global-batch-size 3 "
         "--microbatch-group-size-per-virtual-pipeline-stage 3", 2)
    make(pp2 + "--micro-batch-size 1 --global-batch-size 5 "
         "--microbatch-group-size-per-virtual-pipeline-stage 3", 2)


def test_uneven_and_accounted_pipeline_splits():
    make("--num-layers 10 --pipeline-model-parallel-size 4 --decoder-first-pipeline-num-layers 1 "
         "--decoder-last-pipeline-num-layers 3", 4)
    make("--num-layers 6 --pipeline-model-parallel-size 4 --account-for-embedding-in-pipeline-split "
         "--account-for-loss-in-pipeline-split", 4)
    args = make("--num-layers 12 --pipeline-model-parallel-size 3 --num-virtual-stages-per-pipeline-rank 2 "
                "--decoder-first-pipeline-num-layers 2 --decoder-last-pipeline-num-layers 2 "
                "--global-batch-size 6", 3)
    assert args.virtual_pipeline_model_parallel_size == 2


def test_switches_and_resolved_values():
    assert not make("--sequence-parallel").sequence_parallel  # TP=1: forced off
    assert make("--sequence-parallel --tensor-model-parallel-size 2", 2).sequence_parallel
    args = make("--recompute-activations")
    assert args.recompute_granularity == "selective" and not hasattr(args, "recompute_activations")
    assert args.recompute_modules == ["core_attn"]
    make("--recompute-granularity full --recompute-method block --recompute-num-layers 2")
    assert make().distributed_backend == "gloo"
    with_cuda = validate_args(parse_args(f"{BASE} {TRAIN}".split()), 1, cuda_available=True)
    assert with_cuda.distributed_backend == "nccl"
    assert make("--distributed-backend nccl").distributed_backend == "nccl"
    assert make("--context-parallel-size 2 --cp-comm-type allgather", 2).cp_comm_type == ["all_gather"]
    args = make()
    assert (args.consumed_train_samples, args.consumed_valid_samples, args.skipped_train_samples) == (0, 0, 0)
    assert args.padded_vocab_size is None
    assert (args.start_weight_decay, args.end_weight_decay) == (0.01, 0.01)


NO_MOCK = f"{BASE.replace('--mock-data', '')} {TRAIN}"


def test_legacy_split_default_warns():
    notices = []
    args = validate_args(parse_args(f"{NO_MOCK} --data-path /d/x".split()), 1, cuda_available=False,
                         warn=notices.append)
    assert args.split == "969, 30, 1" and len(notices) == 1 and "--split" in notices[0]
    args = validate_args(parse_args(f"{NO_MOCK} --data-path 0.3 /d/x 0.7 /d/y --split 99,1,0".split()), 1,
                         cuda_available=False, warn=notices.append)
    assert args.split == "99,1,0" and len(notices) == 1


def test_tokenizer_files_required_for_real_data():
    args = parse_args(f"{NO_MOCK} --data-path /d/x --tokenizer-type GPT2BPETokenizer".split())
    with pytest.raises(ConfigError, match="GPT2BPETokenizer needs --vocab-file and --merge-file"):
        validate_args(args, 1, cuda_available=False)
    args = parse_args(f"{NO_MOCK} --data-path /d/x --tokenizer-type Llama2Tokenizer".split())
    with pytest.raises(ConfigError, match="--tokenizer-type Llama2Tokenizer needs --tokenizer-model"):
        validate_args(args, 1, cuda_available=False)
    make("--tokenizer-type GPT2BPETokenizer")  # --mock-data needs only a vocabulary size
    with pytest.raises(ConfigError, match="--tokenizer-type NullTokenizer needs --vocab-size"):
        validate_args(parse_args(f"{BASE.replace('--vocab-size 128', '')} {TRAIN}".split()), 1)


def test_split_rejected_with_per_split_paths():
    args = parse_args(f"{NO_MOCK} --train-data-path /d/a --valid-data-path /d/b --split 1,0,0".split())
    with pytest.raises(ConfigError, match="--split does not apply to --train/valid/test-data-path"):
        validate_args(args, 1, cuda_available=False)


def test_validate_twice_is_stable():
    args = make("--recompute-activations --bf16 --group-query-attention --num-query-groups 2")
    before = dict(vars(args))
    assert vars(validate_args(args, 1, cuda_available=False)) == before


def test_pad_vocab_size():
    assert pad_vocab_size(50257, 128, 1) == 50304  # GPT-2, spec §3.7
    assert pad_vocab_size(50257, 128, 2) == 50432
    assert pad_vocab_size(50257, 128, 4) == 50688
    assert pad_vocab_size(50304, 128, 1) == 50304
    assert pad_vocab_size(32000, 128, 8) == 32768
    assert padded_vocab_line(50257, 50304) == (
        " > padded vocab (size: 50257) with 47 dummy tokens (new size: 50304)")


def test_world_size_line():
    args = make("--tensor-model-parallel-size 2 --context-parallel-size 2 "
                "--hierarchical-context-parallel-sizes 2 1", 8)
    assert world_size_line(args) == (
        "using world size: 8, data-parallel size: 2, context-parallel size: 2, hierarchical "
        "context-parallel sizes: [2, 1], tensor-model-parallel size: 2, pipeline-model-parallel size: 1")


# ---------------------------------------------------------------------------------------------
# (5) argument dump (spec §3.1)


def test_args_dump_exact():
    ns = argparse.Namespace(micro_batch_size=4, zeta=0.5, Zeta_Flag=True, lr=None, a_b="x", wandb_project="")
    setattr(ns, "n" * 48, 1)  # >= 48 chars: no dots, so two spaces
    setattr(ns, "m" * 50, [1, 2])
    expected = (
        "------------------------ arguments ------------------------\n"
        "  a_b ............................................. x\n"
        "  lr .............................................. None\n"
        "  micro_batch_size ................................ 4\n"
        "  mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm  [1, 2]\n"
        "  nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn  1\n"
        "  wandb_project ................................... \n"
        "  zeta ............................................ 0.5\n"
        "  Zeta_Flag ....................................... True\n"
        "-------------------- end of arguments ---------------------"
    )
    assert format_args_dump(ns) == expected


def test_args_dump_of_validated_args():
    args = make("--bf16 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", 8)
    lines = format_args_dump(args).split("\n")
    assert lines[0] == "-" * 24 + " arguments " + "-" * 24
    assert lines[-1] == "-" * 20 + " end of arguments " + "-" * 21
    body = lines[1:-1]
    assert body == sorted(body, key=str.lower)
    shown = {}
    for line in body:
        match = re.fullmatch(r"  (\S+) (\.*) (.*)", line)
        assert match, line
        assert len(match.group(2)) == max(0, 48 - len(match.group(1))), line
        shown[match.group(1)] = match.group(3)
    assert sorted(shown) == sorted(vars(args))
    assert shown["data_parallel_size"] == "2" and shown["params_dtype"] == "torch.bfloat16"
    assert shown["virtual_pipeline_model_parallel_size"] == "None"
    assert shown["consumed_train_samples"] == "0" and shown["padded_vocab_size"] == "None"


# ---------------------------------------------------------------------------------------------
# (6) unknown flags


@pytest.mark.parametrize("bad", ["--foo-bar", "--num-layer"])  # typo and abbreviation both rejected
def test_unknown_flag_exits_naming_it(bad, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(f"{BASE} {bad} 3".split())
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unrecognized arguments") and bad in err
    assert err.count("\n") == 1  # one line, not argparse's 200 lines of usage first


def test_ignore_unknown_args():
    assert parse_args(f"{BASE} --foo-bar 3".split(), ignore_unknown_args=True).num_layers == 4


def _write_snapshot() -> None:
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text("\n".join(current_flags()) + "\n")
    print(f"wrote {len(current_flags())} flags to {SNAPSHOT}")


if __name__ == "__main__" and "--update-snapshot" in sys.argv:
    _write_snapshot()


def test_megatron_launch_script_flags_are_accepted():
    """`--use-mcore-models` (deprecated and ignored by Megatron-LM itself) and
    `--use-persistent-ckpt-worker` appear in most of Megatron's launch scripts and test configs."""
    args = make("--use-mcore-models --use-persistent-ckpt-worker --ckpt-fully-parallel-save", 1)
    assert args.deprecated_use_mcore_models and args.use_persistent_ckpt_worker
    assert args.ckpt_fully_parallel_save
    assert not make("--no-ckpt-fully-parallel-save", 1).ckpt_fully_parallel_save

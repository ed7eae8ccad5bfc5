"""Megatron-LM flags in the sense Megatron gives them (config/megatron_flags.py): aliases, the
deprecation notice, and the exact one-line refusal of each flag megatron_lite cannot honour."""
from __future__ import annotations

import pytest

from megatron_lite.config.arguments import parse_args
from megatron_lite.config.validation import ConfigError, validate_args
from tests.unit.test_arguments import BASE, TRAIN, make

SUPPORTED = ("GPT2BPETokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, "
             "TikTokenizer, HuggingFaceTokenizer, NullTokenizer")

REFUSALS = [
    ("--tokenizer-type BertWordPieceCase",
     f"--tokenizer-type BertWordPieceCase is not supported by megatron_lite (supported: {SUPPORTED})"),
    ("--tokenizer-type SFTTokenizer",
     f"--tokenizer-type SFTTokenizer is not supported by megatron_lite (supported: {SUPPORTED})"),
    ("--spec local", "--spec is not supported by megatron_lite (its layers are built from the model flags, "
     "not from a layer spec)"),
    ("--step-batch-size-schedule 0:16",
     "--step-batch-size-schedule is not supported by megatron_lite (use --rampup-batch-size)"),
    ("--rerun-mode validate_results", "--rerun-mode validate_results is not supported by megatron_lite (only "
     "disabled: a NaN loss stops the run with an error, without re-running the step)"),
    ("--max-tokens-to-oom 3600000", "--max-tokens-to-oom is a flag of Megatron-LM's inference server, which "
     "megatron_lite does not have"),
    ("--decoder-num-layers 6", "--decoder-num-layers (6) differs from --num-layers (4); a GPT has only "
     "decoder layers"),
    ("--transformer-impl local --attention-backend flash", "--attention-backend flash needs "
     "--transformer-impl transformer_engine (Megatron-LM's local layers attend unfused)"),
    ("--qk-layernorm", "--qk-layernorm is not supported by megatron_lite"),
    ("--apply-residual-connection-post-layernorm",
     "--apply-residual-connection-post-layernorm is not supported by megatron_lite"),
    ("--distribute-saved-activations", "--distribute-saved-activations is not supported by megatron_lite"),
    ("--fp16-lm-cross-entropy --fp16",
     "--fp16-lm-cross-entropy is not supported by megatron_lite (the cross entropy runs in fp32)"),
    ("--recompute-activations --recompute-modules core_attn mlp",
     "--recompute-modules mlp is not supported by megatron_lite (only core_attn)"),
    ("--cross-entropy-loss-fusion --cross-entropy-fusion-impl te", "--cross-entropy-fusion-impl te needs "
     "Transformer Engine, which megatron_lite does not use (native is supported)"),
    ("--fp8-recipe tensorwise", "--fp8-recipe needs --fp8-format, which megatron_lite does not support"),
    ("--grad-reduce-in-bf16", "--grad-reduce-in-bf16 needs --bf16"),
    ("--moe-router-topk 8",
     "--moe-router-topk needs --num-experts (mixture of experts), which megatron_lite does not support"),
    ("--expert-tensor-parallel-size 4", "--expert-tensor-parallel-size needs --num-experts (mixture of "
     "experts), which megatron_lite does not support"),
    ("--no-align-grad-reduce", "--no-align-grad-reduce is not supported by megatron_lite"),
    ("--ckpt-format torch", "--ckpt-format torch is not supported by megatron_lite (torch_dist is)"),
    ("--ckpt-format fsdp_dtensor", "--ckpt-format fsdp_dtensor is not supported by megatron_lite "
     "(torch_dist is)"),
    ("--non-persistent-save-interval 5", "--non-persistent-save-interval is not supported by megatron_lite"),
    ("--non-persistent-ckpt-type local", "--non-persistent-ckpt-type is not supported by megatron_lite"),
    ("--ckpt-convert-format torch", "--ckpt-convert-format is not supported by megatron_lite"),
    ("--ckpt-convert-save /tmp/x", "--ckpt-convert-save is not supported by megatron_lite"),
    ("--wandb-exp-name run1",
     "--wandb-exp-name needs --wandb-project (W&B), which megatron_lite does not support"),
]


@pytest.mark.parametrize("extra,message", REFUSALS, ids=[r[0][:50] for r in REFUSALS])
def test_refused_by_name_in_one_line(extra, message):
    with pytest.raises(ConfigError) as info:
        make(extra)
    assert str(info.value) == message


def test_no_align_param_gather_refused_only_with_virtual_stages():
    # Without virtual stages validation turns alignment off itself, as Megatron-LM does.
    assert not make("--no-align-param-gather").align_param_gather
    with pytest.raises(ConfigError) as info:
        make("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
             "--global-batch-size 4 --no-align-param-gather", 2)
    assert str(info.value) == "--no-align-param-gather is not supported by megatron_lite"


def test_pretrain_prints_the_refusal_as_one_error_line():
    import torch.distributed as dist

    from megatron_lite.training.pretrain import pretrain

    try:
        with pytest.raises(SystemExit) as info:
            pretrain(f"{BASE} {TRAIN} --tokenizer-type BertWordPieceCase".split())
    finally:  # validation runs after the (one-process) group is up: leave none behind
        if dist.is_initialized():
            dist.destroy_process_group()
    assert str(info.value) == (f"error: --tokenizer-type BertWordPieceCase is not supported by megatron_lite "
                               f"(supported: {SUPPORTED})")


def test_decoder_num_layers_is_num_layers():
    argv = f"{BASE} {TRAIN} --decoder-num-layers 6".replace("--num-layers 4 ", "").split()
    args = validate_args(parse_args(argv), 1, cuda_available=False)
    assert args.num_layers == 6
    assert make("--decoder-num-layers 4").num_layers == 4


def test_transformer_impl_local_attends_unfused():
    assert make("--transformer-impl local").attention_backend == "local"
    assert make("--transformer-impl local --attention-backend unfused").attention_backend == "unfused"
    assert make().attention_backend == "auto"


def test_deprecated_parallel_save_flag_prints_megatrons_notice():
    notices = []
    args = make("--ckpt-fully-parallel-save", warn=notices.append)
    assert notices == ["--ckpt-fully-parallel-save flag is deprecated and has no effect. "
                       "Use --no-ckpt-fully-parallel-save to disable parallel save."]
    assert args.ckpt_fully_parallel_save


def test_accepted_values_pass():
    make("--rerun-mode disabled --max-tokens-to-oom 12000 --fp8-recipe delayed --moe-router-topk 2 "
         "--expert-tensor-parallel-size 1 --recompute-activations --recompute-modules core_attn "
         "--cross-entropy-fusion-impl native --bf16 --grad-reduce-in-bf16 --ckpt-format torch_dist "
         "--use-mcore-models --use-persistent-ckpt-worker --ckpt-assume-constant-structure "
         "--ckpt-fully-parallel-load --dist-ckpt-optim-fully-reshardable --auto-detect-ckpt-format "
         "--no-use-tokenizer-model-from-checkpoint-args --logging-level 40 "
         "--check-weight-hash-across-dp-replicas-interval 10 --use-flash-attn --openai-gelu "
         "--no-bias-dropout-fusion")
    args = make("--tensor-model-parallel-size 2 --expert-tensor-parallel-size 2", 2)
    assert args.expert_tensor_parallel_size == 2


@pytest.mark.parametrize("value,reason", [
    ("raise_all", "checkpoint tensors the model lacks are skipped, not an error; use raise_unexpected"),
    ("return_all", "it hands mismatches to a calling program; use log_all"),
])
def test_dist_ckpt_strictness_values_the_loader_cannot_honour(value, reason):
    with pytest.raises(ConfigError) as info:
        make(f"--dist-ckpt-strictness {value}")
    assert str(info.value) == f"--dist-ckpt-strictness {value} is not supported by megatron_lite ({reason})"
    for accepted in ("assume_ok_unexpected", "raise_unexpected", "log_unexpected", "log_all", "ignore_all"):
        make(f"--dist-ckpt-strictness {accepted}")


def test_partial_load_strictness_names_itself_when_a_tensor_is_missing():
    from megatron_lite.training.checkpointing import strictness_note

    missing = "/c/iter_0000002: cannot load (Missing key in checkpoint state_dict: model.x.weight.)"
    assert strictness_note("log_all", missing) == (
        " (--dist-ckpt-strictness log_all would load the rest; megatron_lite never loads a checkpoint "
        "partially)")
    assert strictness_note("assume_ok_unexpected", missing) == ""  # Megatron-LM fails here too
    assert strictness_note("log_all", "/c: truncated checkpoint") == ""


def test_squared_relu_mlp():
    import torch
    import torch.nn.functional as F

    from megatron_lite.distributed.parallel_state import ParallelState
    from tests.model_utils import build, tiny_config

    model = build(tiny_config("gpt", squared_relu=True), ParallelState.create())
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(4, 2, 64)
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    expected = F.linear(F.relu(F.linear(x, fc1.weight, fc1.bias)).pow(2), fc2.weight, fc2.bias)
    torch.testing.assert_close(mlp(x), expected)
    gelu_model = build(tiny_config("gpt"), ParallelState.create())
    assert not torch.allclose(gelu_model.decoder.layers[0].mlp(x), expected)


def test_padded_vocab_size_flag_is_used_as_given():
    """Megatron-LM pads the vocabulary only when --padded-vocab-size is not given."""
    import argparse
    import io

    from megatron_lite.training.builders import resolve_padded_vocab_size
    from megatron_lite.training.logging import RankLogger

    out = io.StringIO()
    args = argparse.Namespace(padded_vocab_size=None, make_vocab_size_divisible_by=128,
                              tensor_model_parallel_size=2)
    resolve_padded_vocab_size(args, 50257, RankLogger(0, 1, out), 0)
    assert args.padded_vocab_size == 50432 and "(new size: 50432)" in out.getvalue()
    args.padded_vocab_size = 50260
    resolve_padded_vocab_size(args, 50257, RankLogger(0, 1, out), 0)
    assert args.padded_vocab_size == 50260
    args.padded_vocab_size = 50000
    with pytest.raises(SystemExit) as info:
        resolve_padded_vocab_size(args, 50257, RankLogger(0, 1, out), 0)
    assert str(info.value) == ("error: --padded-vocab-size (50000) must be >= the tokenizer's vocabulary "
                               "size (50257) and divisible by --tensor-model-parallel-size (2)")


@pytest.mark.parametrize("keep,expected", [
    (False, ("HuggingFaceTokenizer", "/ckpt/tok")),  # Megatron-LM's default: the checkpoint's tokenizer
    (True, ("NullTokenizer", None)),  # --no-use-tokenizer-model-from-checkpoint-args: the command line's
])
def test_tokenizer_from_checkpoint_args(monkeypatch, keep, expected):
    import io

    from megatron_lite.training import checkpointing
    from megatron_lite.training.logging import RankLogger

    saved = {"num_layers": 4, "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "/ckpt/tok"}
    monkeypatch.setattr(checkpointing, "saved_args", lambda load, step: saved)
    flags = "--use-checkpoint-args --load /ckpt"
    if keep:
        flags += " --no-use-tokenizer-model-from-checkpoint-args"
    args = parse_args(f"{BASE} {TRAIN} {flags}".split())
    out = io.StringIO()
    checkpointing.use_checkpoint_args(args, RankLogger(0, 1, out))
    assert (args.tokenizer_type, args.tokenizer_model) == expected
    assert ("tokenizer_type" in out.getvalue()) is not keep

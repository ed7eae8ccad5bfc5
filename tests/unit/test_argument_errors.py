"""Validation errors name the flags at fault, in one line (config/validation.py): the cases of
test_arguments.py's flag set, kept in a file of their own."""
from __future__ import annotations

import re

import pytest

from megatron_lite.config.arguments import parse_args
from megatron_lite.config.validation import ConfigError, validate_args
from tests.unit.test_arguments import BASE, TRAIN, make

ERROR_CASES = [
    # (extra flags, world size, substrings the message must contain)
    ("--tensor-model-parallel-size 3", 2,
     ["--tensor-model-parallel-size (3)", "--pipeline-model-parallel-size (1)", "--context-parallel-size (1)",
      "world size (2)"]),
    ("--tensor-model-parallel-size 3", 3, ["--num-attention-heads (4)", "--tensor-model-parallel-size (3)"]),
    ("--group-query-attention --num-query-groups 2 --tensor-model-parallel-size 4", 4,
     ["--num-query-groups (2)", "--tensor-model-parallel-size (4)"]),
    ("--group-query-attention --num-query-groups 3", 1,
     ["--num-attention-heads (4)", "--num-query-groups (3)"]),
    ("--global-batch-size 6", 2,
     ["--global-batch-size (6)", "--micro-batch-size (2)", "data-parallel size (2)"]),
    ("--num-layers 5 --pipeline-model-parallel-size 2", 2,
     ["--num-layers (5)", "--pipeline-model-parallel-size (2)"]),
    ("--num-layers 8 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3", 2,
     ["--num-layers-per-virtual-pipeline-stage (3)"]),
    ("--num-layers 8 --pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 1", 3,
     ["--num-layers (8)", "--decoder-first/last-pipeline-num-layers", "2 middle"]),
    ("--num-layers 8 --pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 3 "
     "--decoder-last-pipeline-num-layers 4", 2,
     ["--decoder-first/last-pipeline-num-layers", "no middle stage"]),
    ("--num-layers 6 --pipeline-model-parallel-size 4 --account-for-embedding-in-pipeline-split", 4,
     ["--account-for-*-in-pipeline-split (7)", "--pipeline-model-parallel-size (4)"]),
    ("--seq-length 128", 1, ["--seq-length (128)", "--max-position-embeddings (64)"]),
    ("--context-parallel-size 2 --seq-length 30", 2, ["--seq-length (30)", "--context-parallel-size"]),
    ("--hidden-size 66", 1, ["--hidden-size (66)", "--num-attention-heads (4)", "--kv-channels"]),
    ("--fp16 --bf16", 1, ["--fp16", "--bf16"]),
    ("--train-samples 100", 1, ["--train-iters", "--train-samples"]),
    ("--save /tmp/ckpt", 1, ["--save", "--save-interval"]),
    ("--save /tmp/ckpt --save-interval 10 --save-retain-interval 15", 1,
     ["--save-retain-interval (15)", "--save-interval (10)"]),
    ("--recompute-granularity full", 1, ["--recompute-granularity full", "--recompute-method"]),
    ("--recompute-granularity full --recompute-method uniform", 1, ["--recompute-num-layers"]),
    ("--recompute-activations --recompute-num-layers 1", 1, ["--recompute-num-layers", "selective"]),
    ("--recompute-granularity selective --recompute-method block", 1, ["--recompute-method", "selective"]),
    ("--overlap-param-gather --overlap-grad-reduce", 1,
     ["--overlap-param-gather", "--use-distributed-optimizer"]),
    ("--overlap-param-gather --use-distributed-optimizer", 1,
     ["--overlap-param-gather", "--overlap-grad-reduce"]),
    ("--num-virtual-stages-per-pipeline-rank 2", 1, ["--pipeline-model-parallel-size > 1"]),
    ("--num-layers-per-virtual-pipeline-stage 1 --num-virtual-stages-per-pipeline-rank 2", 1,
     ["--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"]),
    # spec §6.2: M=3, N=PP=2 -> 3 mod 2 = 1 < PP.
    ("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--micro-batch-size 1 --global-batch-size 3", 2,
     ["number of micro-batches (3)", "--microbatch-group-size-per-virtual-pipeline-stage (2)",
      "--pipeline-model-parallel-size (2)"]),
    ("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--micro-batch-size 1 --global-batch-size 1", 2,
     ["--microbatch-group-size-per-virtual-pipeline-stage (2", "number of micro-batches (1"]),
    ("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--microbatch-group-size-per-virtual-pipeline-stage 1 --global-batch-size 8", 2,
     ["--microbatch-group-size-per-virtual-pipeline-stage (1)", "--pipeline-model-parallel-size (2)"]),
    ("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
     "--no-overlap-p2p-communication --global-batch-size 8", 2,
     ["--no-overlap-p2p-communication", "--pipeline-model-parallel-size > 2"]),
    ("--context-parallel-size 2 --cp-comm-type a2a+p2p", 2, ["--cp-comm-type a2a+p2p",
                                                             "--hierarchical-context-parallel-sizes"]),
    ("--context-parallel-size 2 --hierarchical-context-parallel-sizes 2 2", 2,
     ["--hierarchical-context-parallel-sizes (2 2)", "--context-parallel-size (2)"]),
    ("--cp-comm-type ring", 1, ["--cp-comm-type ring"]),
    ("--context-parallel-size 4 --cp-comm-type a2a --num-attention-heads 2 --hidden-size 64", 4,
     ["--cp-comm-type a2a", "--num-attention-heads / --tensor-model-parallel-size (2)", "(4)"]),
    ("--context-parallel-size 4 --cp-comm-type a2a --group-query-attention --num-query-groups 3 "
     "--num-attention-heads 12 --hidden-size 96", 4,
     ["--cp-comm-type a2a", "--num-query-groups / --tensor-model-parallel-size (3)"]),
    ("--context-parallel-size 4 --cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes 2 2 "
     "--group-query-attention --num-query-groups 3 --num-attention-heads 6 --hidden-size 96", 4,
     ["--cp-comm-type a2a+p2p", "--num-query-groups / --tensor-model-parallel-size (3)", "size (2)"]),
    ("--context-parallel-size 2 --reset-attention-mask", 2,
     ["--reset-attention-mask", "--context-parallel-size"]),
    ("--num-experts 8", 1, ["--num-experts"]),
    ("--use-torch-fsdp2", 1, ["--use-torch-fsdp2"]),
    ("--fp8-format e4m3", 1, ["--fp8-format"]),
    ("--wandb-project p", 1, ["--wandb-project"]),
    ("--log-progress", 1, ["--log-progress"]),
    ("--profile --use-pytorch-profiler", 1, ["--use-pytorch-profiler", "--tensorboard-dir"]),
    ("--profile --profile-step-start 5 --profile-step-end 5", 1, ["--profile-step-end (5)",
                                                                  "--profile-step-start (5)"]),
    ("--position-embedding-type mrope", 1, ["--position-embedding-type mrope"]),
    ("--swiglu --squared-relu", 1, ["--swiglu", "--squared-relu"]),
    ("--data-path /data/x_text_document", 1, ["--mock-data", "--data-path"]),
    ("--min-lr 0.1", 1, ["--min-lr (0.1)", "--lr (0.001)"]),
    ("--weight-decay-incr-style linear", 1, ["--weight-decay-incr-style linear", "--start-weight-decay",
                                            "--end-weight-decay"]),
    ("--start-weight-decay 0.1", 1, ["--start-weight-decay", "--weight-decay-incr-style"]),
    ("--lr-decay-samples 100", 1, ["--lr-decay-samples", "--train-samples"]),
    ("--lr-warmup-fraction 0.1 --lr-warmup-iters 2", 1, ["--lr-warmup-fraction", "--lr-warmup-iters"]),
    ("--tensor-model-parallel-size 2 --tp-comm-overlap", 2, ["--tp-comm-overlap", "--sequence-parallel"]),
]


@pytest.mark.parametrize("extra,world,needles", ERROR_CASES, ids=[c[0][:60] for c in ERROR_CASES])
def test_validation_error_names_flags(extra, world, needles):
    with pytest.raises(ConfigError) as info:
        make(extra, world)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_world_size_error_message_exact():
    with pytest.raises(ConfigError) as info:
        make("--tensor-model-parallel-size 3", 2)
    assert str(info.value) == ("--tensor-model-parallel-size (3) x --pipeline-model-parallel-size (1) x "
                               "--context-parallel-size (1) = 3 does not divide the world size (2)")


@pytest.mark.parametrize("train,needles", [
    ("--lr 1e-3", ["--train-iters", "--train-samples", "--skip-train"]),
    ("--train-iters 10", ["--lr"]),
])
def test_training_length_and_lr_required(train, needles):
    with pytest.raises(ConfigError) as info:
        make(train=train)
    assert all(n in str(info.value) for n in needles), str(info.value)
    make("--skip-train", train="")  # evaluation-only runs need neither


@pytest.mark.parametrize("missing", ["--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                                     "--micro-batch-size"])
def test_required_flags(missing):
    argv = re.sub(rf"{missing} \S+ ?", "", f"{BASE} {TRAIN}").split()
    with pytest.raises(ConfigError, match=f"^{missing} is required$"):
        validate_args(parse_args(argv), 1, cuda_available=False)

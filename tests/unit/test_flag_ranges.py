"""Issue 15: every numeric flag outside its domain fails at startup with one line naming the
flag and the value (megatron_lite/config/ranges.py); values on the edge of a domain, and
Megatron's "0 means off" values, are accepted."""
from __future__ import annotations

import pytest

from megatron_lite.config.arguments import build_parser, parse_args
from megatron_lite.config.data_config import data_config_from_args
from megatron_lite.config.ranges import CHECKED_ELSEWHERE, RANGES, flag_of
from megatron_lite.config.validation import ConfigError, validate_args
from megatron_lite.training.pretrain import pretrain
from tests.unit.test_arguments import BASE, TRAIN, make

NO_MOCK = f"{BASE.replace('--mock-data', '')} {TRAIN}"

# (extra flags, flag the message must name, value it must show). argparse reads "-1" and "-0.1"
# as values but "-1e-5" as an option, hence the "=" spellings.
REFUSED = [
    # the tester's reports
    ("--ffn-hidden-size 0", "--ffn-hidden-size", "0"),
    ("--kv-channels 0", "--kv-channels", "0"),
    ("--clip-grad -1", "--clip-grad", "-1.0"),
    ("--eval-iters -1", "--eval-iters", "-1"),
    ("--log-interval 0", "--log-interval", "0"),
    ("--train-iters 0", "--train-iters", "0"),
    ("--weight-decay -1", "--weight-decay", "-1.0"),
    ("--adam-beta1 1.5", "--adam-beta1", "1.5"),
    ("--init-method-std -1", "--init-method-std", "-1.0"),
    ("--hidden-dropout 2.0", "--hidden-dropout", "2.0"),
    ("--attention-dropout 1.0", "--attention-dropout", "1.0"),
    ("--attention-dropout -0.1", "--attention-dropout", "-0.1"),
    ("--distributed-timeout-minutes 0", "--distributed-timeout-minutes", "0"),
    # network size
    ("--kv-channels -8", "--kv-channels", "-8"),
    ("--num-query-groups 0", "--num-query-groups", "0"),
    ("--max-position-embeddings 0", "--max-position-embeddings", "0"),
    ("--rotary-base 0", "--rotary-base", "0"),
    ("--rotary-percent 0", "--rotary-percent", "0.0"),
    ("--rotary-percent 1.5", "--rotary-percent", "1.5"),
    ("--rotary-seq-len-interpolation-factor 0", "--rotary-seq-len-interpolation-factor", "0"),
    ("--rope-scaling-factor 0", "--rope-scaling-factor", "0.0"),
    ("--make-vocab-size-divisible-by 0", "--make-vocab-size-divisible-by", "0"),
    ("--norm-epsilon 0", "--norm-epsilon", "0.0"),
    ("--norm-epsilon=-1e-5", "--norm-epsilon", "-1e-05"),
    # regularization and optimizer
    ("--hidden-dropout -0.5", "--hidden-dropout", "-0.5"),
    ("--weight-decay-incr-style linear --start-weight-decay -0.1 --end-weight-decay 0.1",
     "--start-weight-decay", "-0.1"),
    ("--weight-decay-incr-style linear --start-weight-decay 0 --end-weight-decay -0.1",
     "--end-weight-decay", "-0.1"),
    ("--clip-grad nan", "--clip-grad", "nan"),
    ("--adam-beta1 -0.1", "--adam-beta1", "-0.1"),
    ("--adam-beta2 1.0", "--adam-beta2", "1.0"),
    ("--adam-eps 0", "--adam-eps", "0.0"),
    ("--adam-eps=-1e-8", "--adam-eps", "-1e-08"),
    ("--sgd-momentum 1.0", "--sgd-momentum", "1.0"),
    ("--label-smoothing 1.0", "--label-smoothing", "1.0"),
    ("--label-smoothing -0.1", "--label-smoothing", "-0.1"),
    # training length, exits, housekeeping
    ("--global-batch-size 0", "--global-batch-size", "0"),
    ("--global-batch-size -4", "--global-batch-size", "-4"),
    ("--train-iters -5", "--train-iters", "-5"),
    ("--exit-interval -1", "--exit-interval", "-1"),
    ("--exit-duration-in-mins -1", "--exit-duration-in-mins", "-1"),
    ("--manual-gc-interval -1", "--manual-gc-interval", "-1"),
    ("--profile-step-start -1", "--profile-step-start", "-1"),
    ("--profile-ranks 0 -1", "--profile-ranks", "-1"),
    # initialization
    ("--seed -1", "--seed", "-1"),
    ("--seed 4294967296", "--seed", "4294967296"),
    ("--init-method-std 0", "--init-method-std", "0.0"),
    ("--embedding-init-method-std 0", "--embedding-init-method-std", "0.0"),
    # learning rate
    ("--lr=-1e-3", "--lr", "-0.001"),
    ("--lr nan", "--lr", "nan"),
    ("--lr inf", "--lr", "inf"),
    ("--min-lr -1", "--min-lr", "-1.0"),
    ("--lr-decay-iters 0", "--lr-decay-iters", "0"),
    ("--lr-wsd-decay-iters -1", "--lr-wsd-decay-iters", "-1"),
    ("--lr-warmup-fraction 1.0", "--lr-warmup-fraction", "1.0"),
    ("--lr-warmup-iters -1", "--lr-warmup-iters", "-1"),
    ("--lr-warmup-init -0.1", "--lr-warmup-init", "-0.1"),
    ("--decoupled-lr -1", "--decoupled-lr", "-1.0"),
    # checkpointing
    ("--save-interval 0", "--save-interval", "0"),
    ("--ckpt-step -1", "--ckpt-step", "-1"),
    ("--override-ckpt-iteration -1", "--override-ckpt-iteration", "-1"),
    # mixed precision
    ("--fp16 --loss-scale 0", "--loss-scale", "0.0"),
    ("--loss-scale -1", "--loss-scale", "-1.0"),
    ("--initial-loss-scale 0", "--initial-loss-scale", "0.0"),
    ("--min-loss-scale -1", "--min-loss-scale", "-1.0"),
    ("--loss-scale-window 0", "--loss-scale-window", "0.0"),
    ("--loss-scale-window 1.5", "--loss-scale-window", "1.5"),
    ("--hysteresis 0", "--hysteresis", "0"),
    # distributed
    ("--microbatch-group-size-per-virtual-pipeline-stage 0",
     "--microbatch-group-size-per-virtual-pipeline-stage", "0"),
    ("--local-rank -1", "--local-rank", "-1"),
    ("--num-distributed-optimizer-instances 0", "--num-distributed-optimizer-instances", "0"),
    ("--ddp-bucket-size 0", "--ddp-bucket-size", "0"),
    ("--ddp-num-buckets -1", "--ddp-num-buckets", "-1"),
    ("--hierarchical-context-parallel-sizes -1 -1", "--hierarchical-context-parallel-sizes", "-1"),
    ("--expert-tensor-parallel-size 0", "--expert-tensor-parallel-size", "0"),
    ("--moe-router-topk 0", "--moe-router-topk", "0"),
    # evaluation
    ("--eval-interval 0", "--eval-interval", "0"),
    ("--eval-micro-batch-size 0", "--eval-micro-batch-size", "0"),
    ("--eval-global-batch-size -4", "--eval-global-batch-size", "-4"),
    # data and tokenizer
    ("--num-workers -1", "--num-workers", "-1"),
    ("--num-dataset-builder-threads 0", "--num-dataset-builder-threads", "0"),
    ("--mid-level-dataset-surplus -0.1", "--mid-level-dataset-surplus", "-0.1"),
    ("--vocab-size 0", "--vocab-size", "0"),
    ("--padded-vocab-size 0", "--padded-vocab-size", "0"),
    ("--null-tokenizer-eod-id -1", "--null-tokenizer-eod-id", "-1"),
    ("--tiktoken-num-special-tokens -1", "--tiktoken-num-special-tokens", "-1"),
    # logging
    ("--log-memory-interval 0", "--log-memory-interval", "0"),
    ("--tensorboard-log-interval 0", "--tensorboard-log-interval", "0"),
    ("--tensorboard-queue-size 0", "--tensorboard-queue-size", "0"),
]

# Blends and splits: real data (no --mock-data) on the command line.
REFUSED_DATA = [
    ("--data-path nan /d/a", "--data-path", "nan"),
    ("--data-path 0.5 /d/a inf /d/b", "--data-path", "inf"),
    ("--data-path -1 /d/a 2 /d/b", "--data-path", "-1"),
    ("--data-path 0 /d/a 0 /d/b", "--data-path", "positive sum"),
    ("--train-data-path nan /d/a --valid-data-path /d/b", "--train-data-path", "nan"),
    ("--data-path /d/a --split 1..2", "--split", "'1..2'"),
    ("--data-path /d/a --split 949,,1", "--split", "'949,,1'"),
    ("--data-path /d/a --split=-1,2,3", "--split", "'-1,2,3'"),
    ("--data-path /d/a --split 1e-3,1", "--split", "'1e-3,1'"),
    ("--data-path /d/a --split 1,2,3,4", "--split", "'1,2,3,4'"),
    ("--data-path /d/a --split 0,0,0", "--split", "'0,0,0'"),
    ("--data-path /d/a --split nan", "--split", "'nan'"),
]


def _assert_refused(build, needles) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("extra,flag,value", REFUSED, ids=[c[0] for c in REFUSED])
def test_out_of_range_value_is_refused_by_name(extra, flag, value):
    _assert_refused(lambda: make(extra), [flag, f"(got {value})"])


@pytest.mark.parametrize("extra,flag,value", REFUSED_DATA, ids=[c[0] for c in REFUSED_DATA])
def test_bad_blend_or_split_is_refused_by_name(extra, flag, value):
    _assert_refused(lambda: validate_args(parse_args(f"{NO_MOCK} {extra}".split()), 1, cuda_available=False),
                    [flag, value])


ACCEPTED = [
    "--clip-grad 0 --hidden-dropout 0 --attention-dropout 0 --eval-iters 0 --weight-decay 0",
    "--adam-beta1 0 --adam-beta2 0.999999 --adam-eps 1e-30 --sgd-momentum 0 --label-smoothing 0",
    "--lr 0 --min-lr 0 --lr-warmup-fraction 0 --lr-warmup-init 0 --decoupled-lr 0",
    "--lr-decay-style WSD --lr-decay-iters 1 --lr-wsd-decay-iters 0",
    "--exit-interval 0 --exit-duration-in-mins 0 --manual-gc-interval 0 --profile-step-start 0",
    "--seed 0", "--seed 4294967295", "--train-iters 1 --log-interval 1 --eval-interval 1",
    "--num-workers 0 --mid-level-dataset-surplus 0 --null-tokenizer-eod-id 0 --tiktoken-num-special-tokens 0",
    "--ckpt-step 0 --override-ckpt-iteration 0 --local-rank 0 --profile-ranks 0 1",
    "--fp16 --hysteresis 1 --loss-scale-window 1 --min-loss-scale 4 --initial-loss-scale 4",
    "--fp16 --loss-scale 1024", "--min-loss-scale 8 --initial-loss-scale 4",  # bf16/fp32: no dynamic scaler
    "--rotary-percent 1 --make-vocab-size-divisible-by 1 --norm-epsilon 1e-12",
    "--position-embedding-type rope --kv-channels 16 --rotary-percent 0.5",
    "--ffn-hidden-size 1 --kv-channels 1 --max-position-embeddings 32",
]


@pytest.mark.parametrize("extra", ACCEPTED)
def test_boundary_values_are_accepted(extra):
    args = make(extra)
    parsed = parse_args(f"{BASE} {TRAIN} {extra}".split())
    given = [dest for dest, _ in RANGES if f"{flag_of(dest)} " in f"{extra} "]
    assert given
    for dest in given:  # validation keeps each given value as it was
        assert getattr(args, dest) == getattr(parsed, dest), dest


@pytest.mark.parametrize("extra", ["--split 1", "--split 100,0,0", "--split 98/2/0", "--split .5,.5",
                                   "--split 949,50,1", "--data-path 0 /d/a 1 /d/b"])
def test_boundary_blends_and_splits_are_accepted(extra):
    argv = f"{NO_MOCK} {extra if '--data-path' in extra else '--data-path /d/a ' + extra}".split()
    validate_args(parse_args(argv), 1, cuda_available=False)


@pytest.mark.parametrize("extra,needles", [
    ("--position-embedding-type rope --kv-channels 16 --rotary-percent 0.3125",
     ["--rotary-percent (0.3125)", "--kv-channels (16)", "5 rotary channels"]),
    ("--position-embedding-type rope --kv-channels 15", ["--kv-channels (15)", "15 rotary channels"]),
    ("--position-embedding-type rope --rotary-percent 0.01",
     ["--rotary-percent (0.01)", "0 rotary channels"]),
    ("--fp16 --min-loss-scale 8 --initial-loss-scale 4",
     ["--min-loss-scale (8.0)", "--initial-loss-scale (4.0)"]),
])
def test_related_values_are_refused_by_name(extra, needles):
    _assert_refused(lambda: make(extra), needles)


def test_blend_file_weights_name_the_file(tmp_path):
    listing = tmp_path / "blend.txt"
    listing.write_text("0.5 /d/a nan /d/b\n")
    args = validate_args(parse_args(f"{NO_MOCK} --data-args-path {listing}".split()), 1, cuda_available=False)
    _assert_refused(lambda: data_config_from_args(args), [f"--data-args-path {listing}", "nan"])


def test_pretrain_refuses_before_starting_the_process_group(monkeypatch):
    """--distributed-timeout-minutes is used by init_distributed, before validate_args runs."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as info:
        pretrain(f"{BASE} {TRAIN} --distributed-timeout-minutes 0".split())
    assert str(info.value) == "error: --distributed-timeout-minutes must be >= 1 (got 0)"


def test_every_numeric_flag_has_a_domain():
    """A new int/float flag needs a row in RANGES, or a place in CHECKED_ELSEWHERE."""
    actions = {a.dest: a for a in build_parser()._actions}
    numeric = {dest for dest, a in actions.items() if a.type in (int, float)}
    dests = [dest for dest, _ in RANGES]
    for dest in dests:  # messages name a flag users can type
        assert flag_of(dest) in actions[dest].option_strings, dest
    assert len(dests) == len(set(dests)), "a flag appears twice in RANGES"
    assert not set(dests) & CHECKED_ELSEWHERE
    assert sorted(numeric - set(dests) - CHECKED_ELSEWHERE) == []
    assert sorted((set(dests) | CHECKED_ELSEWHERE) - numeric) == []

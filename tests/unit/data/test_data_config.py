"""The argparse edge of the data pipeline: data/tokenizer flags -> DataConfig / TokenizerConfig."""
import json

import pytest

from megatron_lite.config.arguments import parse_args
from megatron_lite.config.data_config import data_config_from_args, tokenizer_config_from_args
from megatron_lite.config.validation import ConfigError, validate_args
from megatron_lite.data.splits import Blend

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 10 "
        "--lr 1e-3 --eval-interval 5 --eval-iters 2")


def make(extra: str, defaults=None):
    return validate_args(parse_args(f"{BASE} {extra}".split(), defaults=defaults), 2, cuda_available=False)


def test_weighted_data_path_and_sizes():
    args = make("--tokenizer-type NullTokenizer --vocab-size 300 --data-path 0.3 a 0.7 b --split 90,5,5 "
                "--reset-position-ids --num-workers 0 --data-cache-path /tmp/c")
    cfg = data_config_from_args(args)
    assert cfg.blend == Blend(("a", "b"), (0.3, 0.7)) and cfg.split == "90,5,5"
    assert cfg.num_samples == (80, 3 * 2 * 8, 16)  # spec §2.1
    assert cfg.reset_position_ids and cfg.num_workers == 0 and cfg.data_cache_path == "/tmp/c"
    assert tokenizer_config_from_args(args).vocab_size == 300


def test_per_split_and_files(tmp_path):
    args = make("--tokenizer-type NullTokenizer --vocab-size 300 --train-data-path t1 t2 --valid-data-path v")
    cfg = data_config_from_args(args)
    assert cfg.blend is None and cfg.blend_per_split == (Blend(("t1", "t2")), Blend(("v",)), None)
    (tmp_path / "list").write_text("0.5 x\n0.5 y\n")
    args = make(f"--tokenizer-type NullTokenizer --vocab-size 300 --data-args-path {tmp_path / 'list'}")
    assert data_config_from_args(args).blend == Blend(("x", "y"), (0.5, 0.5))
    (tmp_path / "per.json").write_text(json.dumps({"train": ["a"], "valid": ["b"], "test": ["c"]}))
    per = tmp_path / "per.json"
    args = make(f"--tokenizer-type NullTokenizer --vocab-size 300 --per-split-data-args-path {per}")
    assert data_config_from_args(args).blend_per_split == (Blend(("a",)), Blend(("b",)), Blend(("c",)))


def test_mock_data_tokenizer_without_files():
    args = make("--mock-data", defaults={"tokenizer_type": "GPT2BPETokenizer"})
    cfg = tokenizer_config_from_args(args)
    assert (cfg.tokenizer_type, cfg.vocab_size) == ("NullTokenizer", 50257)
    with pytest.raises(ConfigError, match="needs --vocab-size"):
        tokenizer_config_from_args(make("--mock-data --tokenizer-type Llama2Tokenizer"))
    assert data_config_from_args(args).mock


def test_bad_split_is_a_config_error():
    with pytest.raises(ConfigError, match="--split"):
        data_config_from_args(make("--tokenizer-type NullTokenizer --vocab-size 300 --data-path a --split x"))

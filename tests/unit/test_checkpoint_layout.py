"""Checkpoint directory policies that need no process group: `--save-retain-interval` pruning
and `--use-checkpoint-args` (spec §4.4, §4.5)."""
import json
import os

import pytest

from megatron_lite.checkpoint.checkpoint_args import checkpoint_arg_updates, saved_args
from megatron_lite.checkpoint.layout import CheckpointError, prune_checkpoints, write_tracker
from megatron_lite.config.arguments import parse_args


def _complete(root, iteration, args=None):
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    for name in ("metadata.json", ".metadata"):
        (d / name).write_text("{}")
    (d / "common.json").write_text(json.dumps({"args": args or {}}))
    return d


def test_prune_keeps_multiples_and_the_latest(tmp_path):
    for it in (2, 4, 6, 8, 10):
        _complete(tmp_path, it)
    (tmp_path / "iter_0000012.partial").mkdir()  # an unfinished save is not pruned
    write_tracker(str(tmp_path), 10)
    assert prune_checkpoints(str(tmp_path), 10, 4) == [2, 6]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000008", "iter_0000010",
                                            "iter_0000012.partial", "latest_checkpointed_iteration.txt"]


def test_checkpoint_args_fill_the_model_shape(tmp_path):
    saved = vars(parse_args(["--num-layers", "6", "--hidden-size", "96", "--num-attention-heads", "6",
                             "--seq-length", "64", "--swiglu", "--normalization", "RMSNorm",
                             "--group-query-attention", "--num-query-groups", "2"]))
    _complete(tmp_path, 3, saved)
    write_tracker(str(tmp_path), 3)
    # --hidden-size given on the command line wins; switches always come from the checkpoint.
    args = parse_args(["--hidden-size", "128", "--load", str(tmp_path), "--use-checkpoint-args"])
    updates = checkpoint_arg_updates(vars(args), saved_args(str(tmp_path)))
    assert args.num_layers is None  # computing the updates changes nothing
    for name, value in updates.items():
        setattr(args, name, value)
    changed = list(updates)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (6, 128, 6, 64)
    assert (args.swiglu, args.normalization, args.group_query_attention, args.num_query_groups) == \
        (True, "RMSNorm", True, 2)
    assert set(changed) == {"num_layers", "num_attention_heads", "seq_length", "swiglu", "normalization",
                            "group_query_attention", "num_query_groups"}
    assert saved_args(str(tmp_path / "none")) is None
    with pytest.raises(CheckpointError, match="iter_0000005 does not exist"):
        saved_args(str(tmp_path), ckpt_step=5)

"""Reading Megatron-LM's own torch_dist checkpoints (tests/data/megatron_checkpoints, written by
Megatron-LM HEAD d98e8a6): the pickled common state through the allowlist unpickler, the key
mapping, and the distributed optimizer's flat-buffer layout checked against the weights."""
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_lite.checkpoint.layout import CheckpointError
from megatron_lite.checkpoint.megatron.keys import from_megatron, to_megatron
from megatron_lite.checkpoint.megatron.reader import flat_key, flat_layout, is_distributed
from megatron_lite.checkpoint.megatron.record import is_megatron, read_any_record, read_record
from megatron_lite.checkpoint.megatron.regions import Region, read_regions
from megatron_lite.checkpoint.safe_load import UnsafeCheckpointError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "megatron_checkpoints")
GPT = os.path.join(FIXTURES, "gpt_tp1", "iter_0000002")
LLAMA = os.path.join(FIXTURES, "llama_tp1_bf16_distopt", "iter_0000002")


@pytest.mark.parametrize("directory", [GPT, LLAMA])
def test_common_state_becomes_our_record(directory):
    assert is_megatron(directory)
    common, megatron = read_any_record(directory)
    assert megatron is not None and common["format"] == "megatron"
    assert common["iteration"] == 2 and common["consumed_train_samples"] == 16
    assert common["tensor_model_parallel_size"] == 1 and common["pipeline_model_parallel_size"] == 1
    assert common["opt_param_scheduler"] == {
        "max_lr": 0.001, "lr_warmup_steps": 8, "num_steps": 16, "lr_decay_style": "cosine",
        "lr_decay_steps": 32, "min_lr": 0.0001, "start_wd": 0.1, "end_wd": 0.1,
        "wd_incr_style": "constant", "wd_incr_steps": 32}
    args = common["args"]
    assert (args["num_layers"], args["hidden_size"], args["padded_vocab_size"]) == (4, 64, 512)
    assert args["attention_backend"] == 5  # a Megatron enum, rebuilt as an inert stand-in: its value
    assert args["exit_signal"] == "SIGTERM"
    assert common["has_optimizer"] and common["has_rng"]
    assert set(common["rng_values"]) == {"pp0.tp0"}


def test_keys_map_both_ways():
    for ours, theirs, layer in [
        ("decoder.layers.3.input_layernorm.weight",
         "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3),
        ("decoder.layers.0.pre_mlp_layernorm.bias", "decoder.layers.mlp.linear_fc1.layer_norm_bias", 0),
        ("decoder.layers.2.mlp.linear_fc2.weight", "decoder.layers.mlp.linear_fc2.weight", 2),
        ("embedding.word_embeddings.weight", "embedding.word_embeddings.weight", None),
    ]:
        key = to_megatron(ours)
        assert (key.name, key.layer) == (theirs, layer)
        assert from_megatron(theirs, layer) == ours


def test_flat_buffer_layout_matches_the_bf16_weights():
    """The fp32 master copy in the flat buffer, rounded to bf16, is the stored bf16 weight for
    every parameter: the reverse-order, 64-aligned layout is the one Megatron wrote."""
    record = read_record(LLAMA)
    assert is_distributed(record)
    slots = flat_layout(record, LLAMA)
    assert len(slots) == 4 * 6 + 3  # six tensors per Llama layer + embedding, final norm, head
    for (key, layer), slot in slots.items():
        size = tuple(record.metadata.state_dict_metadata[key].size)
        weight = torch.empty((1, *size[1:]) if layer is not None else size, dtype=torch.bfloat16)
        master = torch.empty(weight.numel(), dtype=torch.float32)
        read_regions(LLAMA, record.metadata, [
            Region(key, (layer, *[0] * (len(size) - 1)) if layer is not None else (0,) * len(size), weight),
            Region(flat_key(record, slot.bucket, "main"), (slot.start,), master)])
        assert torch.equal(master.to(torch.bfloat16), weight.flatten()), key


def test_region_outside_the_stored_tensor_is_one_line():
    record = read_record(GPT)
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    with pytest.raises(CheckpointError, match=r"qkv.weight has shape \[4, 192, 64\] in the checkpoint"):
        read_regions(GPT, record.metadata, [Region(qkv, (4, 0, 0), torch.empty(1, 192, 64))])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_common_state_pickle_runs_nothing(tmp_path):
    """A Megatron-shaped checkpoint whose common_state pickle would run a command is refused in
    one line naming the entry, by --load's and --use-checkpoint-args' reader alike."""
    marker = tmp_path / "pwned"
    directory = tmp_path / "iter_0000002"
    dcp.save({"embedding.word_embeddings.weight": torch.zeros(4, 2),
              "common_state/shard_0_1": _Evil(str(marker))},
             checkpoint_id=str(directory), no_dist=True)
    shutil.copy(os.path.join(GPT, "metadata.json"), directory / "metadata.json")
    assert is_megatron(str(directory))
    refusal = r"common_state/shard_0_1: refusing to load it: it asks for posix.system, "
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        read_any_record(str(directory))
    assert not marker.exists()


def _convert(loader, saver, load_dir, save_dir):
    from tools.checkpoint import convert
    convert.main(["--model-type", "GPT", "--loader", loader, "--saver", saver, "--load-dir", load_dir,
                  "--save-dir", save_dir])


def _training_state_equal(a, b):
    (model_a, opt_a, common_a), (model_b, opt_b, common_b) = a, b
    assert model_a.keys() == model_b.keys()
    for k in model_a:
        assert model_a[k].dtype == model_b[k].dtype and torch.equal(model_a[k], model_b[k]), k
    assert opt_a["step"] == opt_b["step"]
    for kind in ("main", "exp_avg", "exp_avg_sq"):
        assert opt_a[kind].keys() == opt_b[kind].keys() == model_a.keys(), kind
        for k in opt_a[kind]:
            assert torch.equal(opt_a[kind][k], opt_b[kind][k]), (kind, k)
    for key in ("iteration", "consumed_train_samples", "opt_param_scheduler",
                "num_floating_point_operations_so_far"):
        assert common_a[key] == common_b[key], key


@pytest.mark.parametrize("fixture", ["gpt_tp1", "llama_tp1_bf16_distopt"])
def test_convert_megatron_to_lite_and_back_keeps_the_training_state(tmp_path, fixture):
    """--loader core --saver lite, then --loader lite --saver core: weights, fp32 masters,
    moments, step, scheduler and counters survive both ways. (Loading the lite copy with
    pretrain continues Megatron's curve: tests/functional/test_megatron_checkpoint_cli.py.)"""
    from megatron_lite.checkpoint.global_io import read_global_training_state
    from megatron_lite.checkpoint.megatron.global_state import read_megatron_training_state

    source = os.path.join(FIXTURES, fixture)
    lite, back = str(tmp_path / "lite"), str(tmp_path / "megatron")
    _convert("core", "lite", source, lite)
    _convert("lite", "core", lite, back)
    original = read_megatron_training_state(source)
    _training_state_equal(original, read_global_training_state(lite))
    _training_state_equal(original, read_megatron_training_state(back))


def test_written_megatron_checkpoint_matches_megatrons_own(tmp_path):
    """What --saver core writes has Megatron-LM's keys, shapes, dtypes, values and common_state
    (compared with the checkpoint Megatron-LM itself wrote), minus its RNG and rerun state."""
    from megatron_lite.checkpoint.megatron.record import load_entry

    lite, back = str(tmp_path / "lite"), str(tmp_path / "megatron")
    _convert("core", "lite", os.path.join(FIXTURES, "gpt_tp1"), lite)
    _convert("lite", "core", lite, back)
    ours_dir = os.path.join(back, "iter_0000002")
    assert open(os.path.join(back, "latest_checkpointed_iteration.txt")).read() == "2"
    theirs, ours = read_record(GPT), read_record(ours_dir)
    want, got = theirs.metadata.state_dict_metadata, ours.metadata.state_dict_metadata
    assert set(want) - set(got) == {"rerun_state_machine_state/shard_0_1", "rng_state/shard_0.0_1.1"}
    assert set(got) <= set(want)
    for key, meta in want.items():
        if hasattr(meta, "size"):
            assert (meta.size, meta.properties.dtype) == (got[key].size, got[key].properties.dtype), key
            a, b = torch.empty(tuple(meta.size), dtype=meta.properties.dtype), torch.zeros(tuple(meta.size))
            read_regions(GPT, theirs.metadata, [Region(key, (0,) * a.dim(), a)])
            read_regions(ours_dir, ours.metadata, [Region(key, (0,) * b.dim(), b)])
            assert torch.equal(a, b), key
    mine = load_entry(ours_dir, ours.metadata, "common_state/shard_0_1")
    megatron = load_entry(GPT, theirs.metadata, "common_state/shard_0_1")
    assert set(megatron) - set(mine) == {"rerun_state_machine"}
    for key in mine:
        if key != "args":
            assert str(mine[key]) == str(megatron[key]) or mine[key] == megatron[key], key
    mine_args, megatron_args = vars(mine["args"]), vars(megatron["args"])
    assert mine_args.keys() == megatron_args.keys()
    enums = {k for k, v in megatron_args.items() if "megatron." in repr(v)}
    assert enums == {"attention_backend", "inference_cuda_graph_scope"}  # stored as their values
    assert all(mine_args[k] == megatron_args[k] for k in megatron_args if k not in enums)

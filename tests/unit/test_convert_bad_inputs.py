"""`tools/checkpoint/convert.py` on bad inputs: every case ends in one `error:` line naming the
directory or file at fault, never a traceback."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
import convert  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")

LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _hf_dir(path, config=LLAMA, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    return path


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        convert.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def _ckpt(tmp_path, tracker="1", common='{"args": {}}'):
    root = tmp_path / "ckpt"
    it = root / "iter_0000001"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    import torch.distributed.checkpoint as dcp

    dcp.save({"model.w": torch.ones(2)}, checkpoint_id=str(it), no_dist=True)
    (it / "common.json").write_text(common)
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return root


def _to_megatron(hf, tmp_path):
    return ["hf-to-megatron", "--hf-dir", str(hf), "--save", str(tmp_path / "out")]


CASES_HF = [
    ("no-dir", lambda p: p / "missing", "has no config.json"),
    ("no-config", lambda p: _hf_dir(p / "hf", config=None), "has no config.json"),
    ("bad-json", lambda p: _hf_dir(p / "hf", config="{oops"), "config.json: not a JSON object"),
    ("json-list", lambda p: _hf_dir(p / "hf", config="[1, 2]"), "config.json: not a JSON object"),
    ("no-weights", lambda p: _hf_dir(p / "hf"), "has no *.safetensors files"),
    ("unknown-family", lambda p: _hf_dir(p / "hf", config={**LLAMA, "model_type": "bert"}, tensors={}),
     "unsupported model family 'bert'"),
    ("missing-key", lambda p: _hf_dir(p / "hf", config={k: v for k, v in LLAMA.items() if k != "hidden_size"},
                                      tensors={}), "config.json: Hugging Face config has no 'hidden_size'"),
    ("missing-tensor", lambda p: _hf_dir(p / "hf", config={**LLAMA, "hidden_act": "silu"},
                                         tensors={"model.norm.weight": torch.ones(64)}), "(*.safetensors): "),
]


@pytest.mark.parametrize("name,make,needle", CASES_HF, ids=[c[0] for c in CASES_HF])
def test_hf_to_megatron_bad_inputs(tmp_path, capsys, name, make, needle):
    message = _error(_to_megatron(make(tmp_path), tmp_path), capsys)
    assert needle in message, message


def test_corrupt_safetensors_file_is_named(tmp_path, capsys):
    hf = _hf_dir(tmp_path / "hf")
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    message = _error(_to_megatron(hf, tmp_path), capsys)
    assert "model.safetensors: cannot read" in message, message


CASES_CKPT = [
    ("no-dir", lambda p: p / "missing", "no latest_checkpointed_iteration.txt"),
    ("bad-tracker", lambda p: _ckpt(p, tracker="x"), "expected an iteration number or 'release'"),
    ("missing-iteration", lambda p: _ckpt(p, tracker="7"), "iter_0000007 does not exist"),
    ("bad-common", lambda p: _ckpt(p, common="{"), "common.json: cannot read"),
    ("common-without-args", lambda p: _ckpt(p, common="{}"), "common.json: not a megatron_lite checkpoint"),
    ("no-vocab", lambda p: _ckpt(p), "pass --vocab-size"),
]


@pytest.mark.parametrize("name,make,needle", CASES_CKPT, ids=[c[0] for c in CASES_CKPT])
def test_megatron_to_hf_bad_inputs(tmp_path, capsys, name, make, needle):
    argv = ["megatron-to-hf", "--load", str(make(tmp_path)), "--hf-dir", str(tmp_path / "hf")]
    message = _error(argv, capsys)
    assert needle in message, message


def test_a_checkpoint_without_the_models_tensors_is_named(tmp_path, capsys):
    hf = tmp_path / "hf_out"
    root = _ckpt(tmp_path, common=json.dumps({"args": {"num_layers": 1, "hidden_size": 8,
                                                       "num_attention_heads": 2, "vocab_size": 16,
                                                       "padded_vocab_size": 16,
                                                       "max_position_embeddings": 8}}))
    argv = ["megatron-to-hf", "--load", str(root), "--hf-dir", str(hf), "--vocab-size", "16"]
    message = _error(argv, capsys)
    assert message.startswith(f"error: --load {root}: global state dict is missing"), message
    assert len(message) < 400  # the list of missing tensors is cut

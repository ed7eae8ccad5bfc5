"""tools/checkpoint/convert.py: Hugging Face -> torch_dist -> (TP=2 model) -> Hugging Face.
The converted model's logits equal transformers' and the round trip is exact."""

import pytest
import torch

from megatron_lite.checkpoint.io import CheckpointContext, CheckpointTargets, load_checkpoint
from megatron_lite.checkpoint.sharded import build_tp_mesh
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models import hf
from megatron_lite.models.gpt import GPTModel
from megatron_lite.training.logging import RankLogger
from tools.checkpoint import convert

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _hf_model(family):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _tp_logits(rank, world, path, hf_config, tokens):
    ps = ParallelState.create(tp=world)
    try:
        cfg = hf.model_config_from_hf(hf_config, make_vocab_size_divisible_by=128, tp=1)
        model = GPTModel(cfg, ps)
        ctx = CheckpointContext(build_tp_mesh(ps, "cpu"), ps, torch.device("cpu"))
        loaded = load_checkpoint(path, CheckpointTargets([model]), ctx, RankLogger(rank, world))
        model.eval()
        with torch.no_grad():
            logits = model(tokens)  # [b, s, V/tp]
        parts = [torch.empty_like(logits) for _ in range(world)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.tp_group)
        return loaded.release, torch.cat(parts, dim=-1)
    finally:
        ps.destroy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_round_trip_through_torch_dist(run_dist, tmp_path, family):
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    convert.main(["hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ml")])
    assert (tmp_path / "ml" / "latest_checkpointed_iteration.txt").read_text() == "release"

    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    hf_config = model.config.to_dict()
    for release, logits in run_dist(2, _tp_logits, str(tmp_path / "ml"), hf_config, tokens):
        assert release
        torch.testing.assert_close(logits[..., :100], expected, rtol=1e-5, atol=1e-5)

    convert.main(["megatron-to-hf", "--load", str(tmp_path / "ml"), "--hf-dir", str(tmp_path / "back")])
    back = safetensors_torch.load_file(tmp_path / "back" / "model.safetensors")
    original = {
        k: v for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    if model.config.tie_word_embeddings:
        del original["lm_head.weight"]  # safetensors keeps one copy of a tied tensor
    assert set(original) == set(back)
    for key, value in original.items():
        assert torch.equal(back[key], value), key

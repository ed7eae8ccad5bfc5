"""Hugging Face Llama / GPT-2 weights loaded into megatron_lite (TP 1 and 2, pipeline chunks)
give transformers' logits; HF -> global -> HF is exact; mismatches raise clear errors."""
import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.hf import (
    expected_global_shapes,
    global_to_hf,
    hf_config_from_model_config,
    hf_to_global,
    load_global_into_model,
    model_config_from_hf,
)
from megatron_lite.models.init import gather_global

transformers = pytest.importorskip("transformers")

# vocab 100 needs padding (to 128 with divisor 64 at TP 1 and 2), so stripping it is tested.
_VOCAB, _DIVISOR = 100, 64
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def _hf_config(family, **kw):
    common = dict(vocab_size=_VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  attn_implementation="eager")
    if family == "llama":
        # GQA: 8 query heads share 4 KV heads; theta 5e5 puts head_dim-8 frequencies in all
        # three llama3 bands (kept / interpolated / divided) when that scaling is on.
        return transformers.LlamaConfig(**{**dict(
            hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2,
            intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5e5,
            tie_word_embeddings=False), **common, **kw})
    return transformers.GPT2Config(**{**dict(n_embd=64, n_head=4, n_layer=2, n_positions=32), **common, **kw})


def _hf_model(family, seed=0, **kw):
    """A random fp32 HF model; norms get random gammas/betas so swapped norms cannot hide."""
    config = _hf_config(family, **kw)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model


def _tokens(seed=1, seq=16):
    return torch.randint(0, _VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits  # [b, s, V0]


def _rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def _ours_logits(rank, world, family, hf_config, hf_state, tokens):
    """Build megatron_lite at TP=world from a HF state dict; full-vocab logits, and whether
    gathering the loaded model gives the imported global state back exactly."""
    ps = ParallelState.create(tp=world)
    try:
        cfg = model_config_from_hf(hf_config, family, make_vocab_size_divisible_by=_DIVISOR, tp=world)
        global_state = hf_to_global(hf_state, cfg, family)
        model = GPTModel(cfg, ps).eval()
        load_global_into_model(model, global_state, ps.tp_rank, ps.tp_size)
        with torch.no_grad():
            logits = model(tokens)  # [b, s, V/tp]
        if world > 1:
            parts = [torch.empty_like(logits) for _ in range(world)]
            torch.distributed.all_gather(parts, logits.contiguous(), group=ps.tp_group)
            logits = torch.cat(parts, dim=-1)  # [b, s, V]
        gathered = gather_global(model, ps.tp_group)
        exact = gathered.keys() == global_state.keys() and all(
            torch.equal(gathered[k], global_state[k]) for k in global_state)
        return logits[..., :hf_config["vocab_size"]], exact  # strip the vocabulary padding
    finally:
        ps.destroy()


_VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-llama3-rope-tied": ("llama", {"rope_scaling": _LLAMA3, "tie_word_embeddings": True}),
    "llama-linear-rope-bias": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                         "attention_bias": True, "mlp_bias": True}),
    "gpt2-tied": ("gpt2", {}),
    "gpt2-untied": ("gpt2", {"tie_word_embeddings": False}),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_logits_match_transformers_tp1(variant):
    family, kw = _VARIANTS[variant]
    hf = _hf_model(family, **kw)
    tokens = _tokens()
    logits, exact = _ours_logits(0, 1, family, hf.config.to_dict(), hf.state_dict(), tokens)
    assert exact
    assert _rel_err(logits, _hf_logits(hf, tokens)) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_transformers_tp2(run_dist, family):
    hf = _hf_model(family)
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    results = run_dist(2, _ours_logits, family, hf.config.to_dict(), hf.state_dict(), tokens)
    for rank, (logits, exact) in enumerate(results):
        assert exact, f"rank {rank}: loading then gathering changed the global state"
        assert _rel_err(logits, ref) <= 1e-5, f"rank {rank}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pipeline_chunks_load_their_layers(family):
    """Two chunks (layer 1 + embedding; layer 2 + head) of one global state run as a pipeline.
    GPT-2 is tied, so the last chunk's head is the embedding under its global name."""
    hf = _hf_model(family)
    tokens = _tokens()
    cfg = model_config_from_hf(hf.config, make_vocab_size_divisible_by=_DIVISOR)
    global_state = hf_to_global(hf.state_dict(), cfg, family)
    ps = ParallelState.create()
    first = GPTModel(cfg, ps, layer_numbers=[1], post_process=False).eval()
    last = GPTModel(cfg, ps, layer_numbers=[2], pre_process=False).eval()
    for chunk in (first, last):
        load_global_into_model(chunk, global_state, 0, 1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        hidden = first(tokens, positions)  # [s, b, h]
        logits = last(position_ids=positions, hidden_states=hidden)[..., :_VOCAB]
    assert _rel_err(logits, _hf_logits(hf, tokens)) <= 1e-5


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_round_trip_is_exact(variant):
    family, kw = _VARIANTS[variant]
    hf = _hf_model(family, **kw)
    state = hf.state_dict()
    cfg = model_config_from_hf(hf.config, make_vocab_size_divisible_by=_DIVISOR)
    back = global_to_hf(hf_to_global(state, cfg, family), cfg, family, _VOCAB)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    # The exported config rebuilds the same ModelConfig, and the shapes it promises are the
    # ones a real model has.
    exported = hf_config_from_model_config(cfg, family, _VOCAB)
    rebuilt = type(hf.config)(**exported)
    assert model_config_from_hf(rebuilt, make_vocab_size_divisible_by=_DIVISOR) == cfg
    model = GPTModel(cfg, ParallelState.create())
    params = {model.global_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    assert params == expected_global_shapes(cfg)


def test_mismatches_raise_clear_errors():
    hf = _hf_model("llama")
    cfg = model_config_from_hf(hf.config, make_vocab_size_divisible_by=_DIVISOR)
    state = hf.state_dict()
    key = "model.layers.1.self_attn.k_proj.weight"

    bad = dict(state, **{key: torch.zeros(24, 64)})
    with pytest.raises(ValueError, match=rf"{key}.*\(24, 64\).*\(32, 64\)"):
        hf_to_global(bad, cfg, "llama")
    with pytest.raises(ValueError, match=f"no '{key}'"):
        hf_to_global({k: v for k, v in state.items() if k != key}, cfg, "llama")
    with pytest.raises(ValueError, match="unexpected keys.*model.layers.2.mlp.up_proj.weight"):
        hf_to_global(dict(state, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(1)}), cfg, "llama")
    with pytest.raises(ValueError, match="attention_bias=True with mlp_bias=False"):
        model_config_from_hf(_hf_config("llama", attention_bias=True))
    with pytest.raises(ValueError, match="activation_function 'gelu'"):
        model_config_from_hf(_hf_config("gpt2", activation_function="gelu"))

    global_state = hf_to_global(state, cfg, "llama")
    model = GPTModel(cfg, ParallelState.create())
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    with pytest.raises(ValueError, match=rf"{fc1}.*\(96, 64\).*\(192, 64\)"):
        load_global_into_model(model, dict(global_state, **{fc1: torch.zeros(96, 64)}), 0, 1)
    with pytest.raises(ValueError, match="no 'output_layer.weight'"):
        load_global_into_model(model, {k: v for k, v in global_state.items() if k != "output_layer.weight"},
                               0, 1)
    with pytest.raises(ValueError, match="does not produce.*decoder.layers.5.input_layernorm.weight"):
        load_global_into_model(
            model, dict(global_state, **{"decoder.layers.5.input_layernorm.weight": torch.ones(64)}), 0, 1)
    with pytest.raises(ValueError, match="missing.*output_layer.weight"):
        global_to_hf({k: v for k, v in global_state.items() if k != "output_layer.weight"},
                     cfg, "llama", _VOCAB)

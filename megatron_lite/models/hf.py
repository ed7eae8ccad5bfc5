"""Name, shape and layout maps between megatron_lite's global state dict and Hugging Face
`LlamaForCausalLM` / `GPT2LMHeadModel` state dicts (both directions), plus loading a global
state dict into a tensor-parallel shard / pipeline chunk of a `GPTModel`.

A *global state dict* maps layout-independent names (`GPTModel.global_name`) to dense tensors,
the same for any TP/PP layout; `init.gather_global` produces one from a live model. Hugging
Face is an optional dependency: nothing here imports `transformers`; configs may be config
objects or plain dicts (`config.json`), state dicts are plain `{name: tensor}` dicts.

Layout facts used (spec §4.2): fused QKV rows are grouped per query group,
`[q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]`; SwiGLU fc1 is `[gate; up]`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_lite.config.configs import ModelConfig
from megatron_lite.config.startup_lines import pad_vocab_size
from megatron_lite.models.init import global_shape
from megatron_lite.tensor_parallel.sharding import shard

FAMILIES = ("llama", "gpt2")

# Buffers some HF versions keep in state dicts; they are derived, not learned: GPT-2's causal
# mask (`attn.bias`, `attn.masked_bias`) and RoPE's `inv_freq` (recomputed from the config).
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

# Llama-3 RoPE constants our `rope.inverse_frequencies` hard-codes (spec §11).
_LLAMA3_ROPE_DEFAULTS = (("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                         ("original_max_position_embeddings", 8192))

_MISSING = object()


# ---- configs -----------------------------------------------------------------------------
def _get(hf_config, key: str, default=_MISSING):
    value = (hf_config.get(key, default) if isinstance(hf_config, Mapping)
             else getattr(hf_config, key, default))
    if value is _MISSING:
        raise ValueError(f"Hugging Face config has no {key!r}")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _family(family: str | None, hf_config=None) -> str:
    if family is None and hf_config is not None:
        family = _get(hf_config, "model_type", None)
    _require(family in FAMILIES, f"unsupported model family {family!r}: expected one of {FAMILIES}")
    return family


def _llama_rope(hf_config) -> dict:
    """RoPE fields from either config style: transformers 5 `rope_parameters` (theta inside) or
    4.x top-level `rope_theta` + `rope_scaling`."""
    params = dict(_get(hf_config, "rope_parameters", None) or _get(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rotary_base": float(theta)}
    if kind == "llama3":
        for key, value in _LLAMA3_ROPE_DEFAULTS:
            _require(float(params.get(key, value)) == value,
                     f"llama3 rope scaling with {key}={params.get(key)} is not supported "
                     f"(only {value}, as in Llama 3.1)")
        out.update(use_rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif kind == "linear":
        # HF divides inv_freq by the factor; dividing positions instead gives the same angles.
        out["rotary_seq_len_interpolation_factor"] = float(params["factor"])
    else:
        _require(kind == "default", f"rope scaling type {kind!r} is not supported "
                                    "(default, linear, llama3)")
    return out


def _llama_fields(c) -> dict:
    heads, hidden = _get(c, "num_attention_heads"), _get(c, "hidden_size")
    _require(_get(c, "hidden_act", "silu") == "silu",
             f"Llama hidden_act {_get(c, 'hidden_act')!r} is not supported (SwiGLU needs silu)")
    attn_bias, mlp_bias = bool(_get(c, "attention_bias", False)), bool(_get(c, "mlp_bias", False))
    # HF's attention_bias covers q, k, v *and* o_proj; add_bias_linear covers every linear, so
    # only "both or neither" maps onto ModelConfig.
    _require(attn_bias == mlp_bias, f"Llama attention_bias={attn_bias} with mlp_bias={mlp_bias} "
                                    "is not supported (megatron_lite biases all linears or none)")
    return dict(
        num_layers=_get(c, "num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=_get(c, "num_key_value_heads", None) or heads,
        kv_channels=_get(c, "head_dim", None) or hidden // heads,
        ffn_hidden_size=_get(c, "intermediate_size"),
        max_position_embeddings=_get(c, "max_position_embeddings"),
        position_embedding_type="rope", normalization="RMSNorm",
        norm_epsilon=float(_get(c, "rms_norm_eps", 1e-6)), swiglu=True, add_bias_linear=attn_bias,
        untie_embeddings_and_output_weights=not _get(c, "tie_word_embeddings", False),
        **_llama_rope(c))


def _gpt2_fields(c) -> dict:
    act = _get(c, "activation_function", "gelu_new")
    # Both are the tanh approximation our MLP computes; exact-erf "gelu" would not match.
    _require(act in ("gelu_new", "gelu_pytorch_tanh"),
             f"GPT-2 activation_function {act!r} is not supported (gelu_new / gelu_pytorch_tanh)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        _require(_get(c, key, want) == want, f"GPT-2 {key}={_get(c, key)} is not supported")
    hidden = _get(c, "n_embd")
    return dict(
        num_layers=_get(c, "n_layer"), hidden_size=hidden, num_attention_heads=_get(c, "n_head"),
        ffn_hidden_size=_get(c, "n_inner", None) or 4 * hidden,
        max_position_embeddings=_get(c, "n_positions"), position_embedding_type="learned_absolute",
        normalization="LayerNorm", norm_epsilon=float(_get(c, "layer_norm_epsilon", 1e-5)),
        swiglu=False, add_bias_linear=True,
        untie_embeddings_and_output_weights=not _get(c, "tie_word_embeddings", True))


def model_config_from_hf(hf_config, family: str | None = None, *, make_vocab_size_divisible_by: int = 128,
                         tp: int = 1, padded_vocab_size: int | None = None, **overrides) -> ModelConfig:
    """ModelConfig equivalent to a HF Llama / GPT-2 config (object or `config.json` dict).

    The vocabulary is padded as Megatron pads it (spec §3.7: to a multiple of
    `make_vocab_size_divisible_by * tp`) unless `padded_vocab_size` is given. Dropouts are 0.0
    so that the converted model computes exactly what HF computes; `overrides` win over all.
    """
    family = _family(family, hf_config)
    fields = _llama_fields(hf_config) if family == "llama" else _gpt2_fields(hf_config)
    orig_vocab = _get(hf_config, "vocab_size")
    if padded_vocab_size is None:
        padded_vocab_size = pad_vocab_size(orig_vocab, make_vocab_size_divisible_by, tp)
    _require(padded_vocab_size >= orig_vocab,
             f"padded vocab size ({padded_vocab_size}) is smaller than the HF vocab ({orig_vocab})")
    fields.update(vocab_size=padded_vocab_size, attention_dropout=0.0, hidden_dropout=0.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def _check_representable(cfg: ModelConfig, family: str) -> None:
    """Refuse configs whose HF counterpart would compute something else."""
    if cfg.position_embedding_type == "rope":
        _require(not cfg.rotary_interleaved and cfg.rotary_percent == 1.0,
                 "HF Llama has no interleaved or partial rotary embeddings")
    if family == "llama":
        _require(cfg.position_embedding_type == "rope" and cfg.normalization == "RMSNorm" and cfg.swiglu,
                 "a Llama checkpoint needs rope + RMSNorm + swiglu")
        _require(cfg.add_qkv_bias <= cfg.add_bias_linear,
                 "HF Llama cannot hold a QKV bias without the other linear biases")
    else:
        _require(cfg.position_embedding_type == "learned_absolute" and cfg.normalization == "LayerNorm"
                 and not cfg.swiglu and not cfg.squared_relu and cfg.add_bias_linear,
                 "a GPT-2 checkpoint needs learned positions + LayerNorm + GeLU + biases")
        _require(cfg.num_query_groups == cfg.num_attention_heads
                 and cfg.query_projection_size == cfg.hidden_size,
                 "GPT-2 has no GQA and needs kv_channels * heads == hidden_size")


def hf_config_from_model_config(cfg: ModelConfig, family: str, orig_vocab_size: int) -> dict:
    """`config.json`-style dict (kwargs of `LlamaConfig` / `GPT2Config`) for an export."""
    family = _family(family)
    _check_representable(cfg, family)
    if family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=orig_vocab_size,
                    n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads, n_layer=cfg.num_layers,
                    n_positions=cfg.max_position_embeddings, n_inner=cfg.ffn_hidden_size,
                    layer_norm_epsilon=cfg.norm_epsilon, activation_function="gelu_new",
                    tie_word_embeddings=not cfg.untie_embeddings_and_output_weights)
    rope_scaling = None
    if cfg.use_rope_scaling:
        rope_scaling = dict(rope_type="llama3", factor=cfg.rope_scaling_factor,
                            **dict(_LLAMA3_ROPE_DEFAULTS))
    elif cfg.rotary_seq_len_interpolation_factor is not None:
        rope_scaling = dict(rope_type="linear", factor=cfg.rotary_seq_len_interpolation_factor)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=orig_vocab_size,
                hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels, hidden_act="silu",
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
                tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
                attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear,
                rope_theta=cfg.rotary_base, rope_scaling=rope_scaling)


# ---- global names and shapes -----------------------------------------------------------------
def expected_global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every global name of the full (all-layers) model and its dense shape."""
    h, v, ffn = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size
    shapes = {"embedding.word_embeddings.weight": (v, h)}
    if cfg.position_embedding_type == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (cfg.max_position_embeddings, h)

    def norm(prefix):
        shapes[prefix + ".weight"] = (h,)
        if cfg.normalization == "LayerNorm":
            shapes[prefix + ".bias"] = (h,)

    def linear(prefix, out_size, in_size, bias):
        shapes[prefix + ".weight"] = (out_size, in_size)
        if bias:
            shapes[prefix + ".bias"] = (out_size,)

    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        norm(p + "input_layernorm")
        linear(p + "self_attention.linear_qkv", cfg.query_projection_size + 2 * cfg.kv_projection_size,
               h, cfg.add_bias_linear or cfg.add_qkv_bias)
        linear(p + "self_attention.linear_proj", h, cfg.query_projection_size, cfg.add_bias_linear)
        norm(p + "pre_mlp_layernorm")
        linear(p + "mlp.linear_fc1", 2 * ffn if cfg.swiglu else ffn, h, cfg.add_bias_linear)
        linear(p + "mlp.linear_fc2", h, ffn, cfg.add_bias_linear)
    norm("decoder.final_layernorm")
    if cfg.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (v, h)
    return shapes


def _check_global_state(state: Mapping, cfg: ModelConfig) -> None:
    expected = expected_global_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    _require(not missing, f"global state dict is missing {missing}")
    _require(not unexpected, f"global state dict has unexpected keys {unexpected}")
    for key, shape in expected.items():
        _require(tuple(state[key].shape) == shape,
                 f"global tensor {key!r} has shape {tuple(state[key].shape)}, the config implies {shape}")


# ---- layout transforms ---------------------------------------------------------------------
def _group_qkv(q, k, v, cfg: ModelConfig) -> torch.Tensor:
    """HF's separate q `[np*d, ...]`, k/v `[ng*d, ...]` -> fused, grouped `[ng*(np/ng+2)*d, ...]`."""
    ng, d, rest = cfg.num_query_groups, cfg.kv_channels, q.shape[1:]
    parts = (q.reshape(ng, -1, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)  # [ng, (np/ng+2)*d, ...] -> rows


def _split_qkv(qkv, cfg: ModelConfig):
    """Inverse of `_group_qkv`: returns q `[np*d, ...]`, k `[ng*d, ...]`, v `[ng*d, ...]`."""
    ng, d, rest = cfg.num_query_groups, cfg.kv_channels, qkv.shape[1:]
    per = cfg.num_attention_heads // ng
    q, k, v = qkv.reshape(ng, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def _transform(kind: str, t: torch.Tensor, cfg: ModelConfig, to_hf: bool) -> torch.Tensor:
    if kind == "t":  # GPT-2's Conv1D stores [in, out]; our linears store [out, in]
        return t.t().contiguous()
    if kind == "gamma" and cfg.apply_layernorm_1p:  # zero-centred gamma is stored as gamma - 1
        return t + 1 if to_hf else t - 1
    return t


def _pairs(cfg: ModelConfig, family: str) -> list[tuple[str, str, str]]:
    """One-to-one (HF name, global name, transform) entries; QKV, SwiGLU fc1 and the vocab-sized
    tensors need more than a rename and are handled by the callers."""
    bias = cfg.add_bias_linear
    out = []
    for i in range(cfg.num_layers):
        g = f"decoder.layers.{i}."
        if family == "llama":
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", g + "input_layernorm.weight", "gamma"),
                    (p + "post_attention_layernorm.weight", g + "pre_mlp_layernorm.weight", "gamma"),
                    (p + "self_attn.o_proj.weight", g + "self_attention.linear_proj.weight", "copy"),
                    (p + "mlp.down_proj.weight", g + "mlp.linear_fc2.weight", "copy")]
            if bias:
                out += [(p + "self_attn.o_proj.bias", g + "self_attention.linear_proj.bias", "copy"),
                        (p + "mlp.down_proj.bias", g + "mlp.linear_fc2.bias", "copy")]
        else:
            p = f"transformer.h.{i}."
            for hf_name, ours, kind in (("ln_1", "input_layernorm", "gamma"),
                                        ("attn.c_proj", "self_attention.linear_proj", "t"),
                                        ("ln_2", "pre_mlp_layernorm", "gamma"),
                                        ("mlp.c_fc", "mlp.linear_fc1", "t"),
                                        ("mlp.c_proj", "mlp.linear_fc2", "t")):
                out += [(p + hf_name + ".weight", g + ours + ".weight", kind),
                        (p + hf_name + ".bias", g + ours + ".bias", "copy")]
    if family == "llama":
        out.append(("model.norm.weight", "decoder.final_layernorm.weight", "gamma"))
    else:
        out += [("transformer.wpe.weight", "embedding.position_embeddings.weight", "copy"),
                ("transformer.ln_f.weight", "decoder.final_layernorm.weight", "gamma"),
                ("transformer.ln_f.bias", "decoder.final_layernorm.bias", "copy")]
    return out


def _embedding_key(family: str) -> str:
    return "model.embed_tokens.weight" if family == "llama" else "transformer.wte.weight"


# ---- HF -> global --------------------------------------------------------------------------
class _HFReader:
    """Takes tensors out of a HF state dict by name, checking shapes; reports leftovers."""

    def __init__(self, hf_state: Mapping):
        self.left = {k: v for k, v in hf_state.items() if not k.endswith(_HF_BUFFER_SUFFIXES)}

    def take(self, key: str, shape: tuple) -> torch.Tensor:
        if key not in self.left:
            raise ValueError(f"Hugging Face state dict has no {key!r}")
        t = self.left.pop(key)
        _require(tuple(t.shape) == tuple(shape),
                 f"Hugging Face tensor {key!r} has shape {tuple(t.shape)}, the config implies {tuple(shape)}")
        return t

    def take_vocab(self, key: str, cfg: ModelConfig) -> torch.Tensor:
        """`[V0, h]` HF rows -> `[V, h]` zero-padded to the config's padded vocabulary."""
        t = self.left.get(key)
        if t is None:
            raise ValueError(f"Hugging Face state dict has no {key!r}")
        _require(t.dim() == 2 and 0 < t.shape[0] <= cfg.vocab_size and t.shape[1] == cfg.hidden_size,
                 f"Hugging Face tensor {key!r} has shape {tuple(t.shape)}, expected [rows <= padded "
                 f"vocab ({cfg.vocab_size}), hidden ({cfg.hidden_size})]")
        del self.left[key]
        rows = t.shape[0]
        padding = t.new_zeros(cfg.vocab_size - rows, cfg.hidden_size)  # dummy tokens (spec §3.7)
        return torch.cat([t, padding])  # [V, h]

    def finish(self) -> None:
        _require(not self.left, f"Hugging Face state dict has unexpected keys {sorted(self.left)}")


def _qkv_from_hf(r: _HFReader, cfg: ModelConfig, family: str, i: int, leaf: str) -> torch.Tensor:
    h, qp, kvp = cfg.hidden_size, cfg.query_projection_size, cfg.kv_projection_size
    tail = (h,) if leaf == "weight" else ()
    if family == "llama":
        p = f"model.layers.{i}.self_attn."
        q = r.take(p + f"q_proj.{leaf}", (qp, *tail))
        k = r.take(p + f"k_proj.{leaf}", (kvp, *tail))
        v = r.take(p + f"v_proj.{leaf}", (kvp, *tail))
    else:
        # c_attn is Conv1D [h, 3h] (bias [3h]) with columns q | k | v, each head-major.
        fused = r.take(f"transformer.h.{i}.attn.c_attn.{leaf}", (*tail, 3 * h))
        q, k, v = (fused.t() if leaf == "weight" else fused).split([qp, kvp, kvp], dim=0)
    return _group_qkv(q, k, v, cfg)  # [(np + 2ng) * d, (h)]


def hf_to_global(hf_state: Mapping, cfg: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """HF `LlamaForCausalLM` / `GPT2LMHeadModel` state dict -> megatron_lite global state dict.

    Strict: a missing, unexpected or misshapen HF tensor raises ValueError naming it. Embedding
    (and untied output) rows are zero-padded to `cfg.vocab_size`. Dtypes are kept; tensors
    that need no re-layout may share storage with the input.
    """
    family = _family(family)
    _check_representable(cfg, family)
    r, out = _HFReader(hf_state), {}
    shapes = expected_global_shapes(cfg)
    for hf_key, key, kind in _pairs(cfg, family):
        shape = shapes[key][::-1] if kind == "t" else shapes[key]
        out[key] = _transform(kind, r.take(hf_key, shape), cfg, to_hf=False)
    qkv_bias = cfg.add_bias_linear or cfg.add_qkv_bias
    for i in range(cfg.num_layers):
        g = f"decoder.layers.{i}."
        out[g + "self_attention.linear_qkv.weight"] = _qkv_from_hf(r, cfg, family, i, "weight")
        if qkv_bias:
            out[g + "self_attention.linear_qkv.bias"] = _qkv_from_hf(r, cfg, family, i, "bias")
        if family == "llama":
            for leaf in ("weight", "bias") if cfg.add_bias_linear else ("weight",):
                tail = (cfg.hidden_size,) if leaf == "weight" else ()
                gate = r.take(f"model.layers.{i}.mlp.gate_proj.{leaf}", (cfg.ffn_hidden_size, *tail))
                up = r.take(f"model.layers.{i}.mlp.up_proj.{leaf}", (cfg.ffn_hidden_size, *tail))
                out[g + f"mlp.linear_fc1.{leaf}"] = torch.cat([gate, up])  # [2*ffn, (h)]: [gate; up]
    embedding = r.take_vocab(_embedding_key(family), cfg)
    out["embedding.word_embeddings.weight"] = embedding
    if cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = r.take_vocab("lm_head.weight", cfg)
    elif "lm_head.weight" in r.left:
        # `model.state_dict()` of a tied HF model lists the head too, as the same tensor.
        head = r.left.pop("lm_head.weight")
        _require(torch.equal(head, embedding[: head.shape[0]]),
                 "the config ties embeddings, but lm_head.weight differs from the embedding")
    r.finish()
    _check_global_state(out, cfg)
    return out


# ---- global -> HF --------------------------------------------------------------------------
def global_to_hf(global_state: Mapping, cfg: ModelConfig, family: str, orig_vocab_size: int,
                 tied_head: bool = True) -> dict[str, torch.Tensor]:
    """megatron_lite global state dict -> HF state dict, vocabulary padding stripped.

    For a tied model `lm_head.weight` is emitted as the embedding tensor itself, as HF's
    `model.state_dict()` lists it; pass `tied_head=False` when writing safetensors files,
    which refuse shared tensors (HF re-ties the head on load).
    """
    family = _family(family)
    _check_representable(cfg, family)
    _check_global_state(global_state, cfg)
    _require(0 < orig_vocab_size <= cfg.vocab_size,
             f"orig_vocab_size ({orig_vocab_size}) must be in [1, padded vocab {cfg.vocab_size}]")
    out = {}
    for hf_key, key, kind in _pairs(cfg, family):
        out[hf_key] = _transform(kind, global_state[key], cfg, to_hf=True)
    leaves = ("weight", "bias") if cfg.add_bias_linear or cfg.add_qkv_bias else ("weight",)
    for i in range(cfg.num_layers):
        g = f"decoder.layers.{i}."
        for leaf in leaves:
            q, k, v = _split_qkv(global_state[g + f"self_attention.linear_qkv.{leaf}"], cfg)
            if family == "llama":
                p = f"model.layers.{i}.self_attn."
                out.update({p + f"q_proj.{leaf}": q, p + f"k_proj.{leaf}": k, p + f"v_proj.{leaf}": v})
            else:
                fused = torch.cat([q, k, v])  # [3h, (h)] rows q | k | v
                out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = (
                    fused.t().contiguous() if leaf == "weight" else fused)  # Conv1D [h, 3h]
        if family == "llama":
            for leaf in ("weight", "bias") if cfg.add_bias_linear else ("weight",):
                gate, up = global_state[g + f"mlp.linear_fc1.{leaf}"].chunk(2)  # [gate; up]
                out[f"model.layers.{i}.mlp.gate_proj.{leaf}"] = gate.contiguous()
                out[f"model.layers.{i}.mlp.up_proj.{leaf}"] = up.contiguous()
    embedding = global_state["embedding.word_embeddings.weight"][:orig_vocab_size].contiguous()
    out[_embedding_key(family)] = embedding
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = global_state["output_layer.weight"][:orig_vocab_size].contiguous()
    elif tied_head:
        out["lm_head.weight"] = embedding
    return out


# ---- loading into a model ----------------------------------------------------------------------
@torch.no_grad()
def load_global_into_model(model, global_state: Mapping, tp_rank: int, tp_size: int,
                           strict: bool = True) -> None:
    """Copy a global state dict into `model` (a GPTModel chunk, possibly TP-sharded): each
    parameter gets this rank's shard of the tensor under its `global_name`, so any layout loads
    the same dict. `global_state` may hold more layers than this chunk; with `strict`, a key
    that no layer of the full model has is an error. Raises ValueError naming the key."""
    if strict:
        expected = expected_global_shapes(model.config)
        unexpected = sorted(k for k in global_state if k not in expected)
        _require(not unexpected, f"global state dict has keys the model config does not produce: "
                                 f"{unexpected}")
    for name, param in model.named_parameters():
        key = model.global_name(name)
        if key not in global_state:
            raise ValueError(f"global state dict has no {key!r} (parameter {name!r} of this model chunk)")
        value = global_state[key]
        want = global_shape(param, tp_size)
        _require(tuple(value.shape) == want, f"global tensor {key!r} has shape {tuple(value.shape)}, "
                                             f"parameter {name!r} needs global shape {want}")
        if getattr(param, "tensor_model_parallel", False):
            value = shard(value, param.partition_dim, tp_rank, tp_size,
                          getattr(param, "partition_stride", 1))  # this rank's rows / columns
        param.copy_(value.to(param.dtype))

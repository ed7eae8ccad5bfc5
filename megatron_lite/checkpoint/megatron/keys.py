"""Parameter names between megatron_lite and Megatron-LM's `torch_dist` layout (spec §4.2-§4.3).

Our parameters carry Megatron's local-spec module names with a global layer index
(`decoder.layers.3.mlp.linear_fc1.weight`). Megatron's distributed checkpoint stacks the layers
on a prepended axis under one key (`decoder.layers.mlp.linear_fc1.weight`, shape `[L, ...]`)
and stores the pre-attention / pre-MLP norms under the fused linear they precede
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`), for the local and the
Transformer Engine specs alike. Everything else keeps its name.
"""
from __future__ import annotations

from dataclasses import dataclass

LAYERS = "decoder.layers."

# Our per-layer name -> Megatron's (the norms live inside the fused linear in its layout).
_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_UNFUSED_NORMS = {v: k for k, v in _FUSED_NORMS.items()}

# Megatron's `module.parameters()` order inside one transformer layer: the norm, then
# Attention registers linear_proj before SelfAttention adds linear_qkv, then the MLP. The
# distributed optimizer lays its flat buffers out in the reverse of this order (spec §8.1).
LAYER_ORDER = (
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.layer_norm_bias",
    "self_attention.linear_proj.weight",
    "self_attention.linear_proj.bias",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.layer_norm_bias",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.bias",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2.bias",
)
BEFORE_LAYERS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
AFTER_LAYERS = ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight")


@dataclass(frozen=True)
class MegatronKey:
    """Where one of our parameters lives in a Megatron checkpoint."""

    name: str  # Megatron's key, e.g. decoder.layers.self_attention.linear_qkv.weight
    layer: int | None  # index on the stacked layer axis (None: not a layer parameter)
    unfused_name: str | None = None  # the same tensor under the norm's own name (other specs)


def to_megatron(name: str) -> MegatronKey:
    """Our global parameter name -> Megatron's key and layer index."""
    if not name.startswith(LAYERS):
        return MegatronKey(name, None)
    index, rest = name[len(LAYERS):].split(".", 1)
    fused = _FUSED_NORMS.get(rest)
    return MegatronKey(LAYERS + (fused or rest), int(index), LAYERS + rest if fused else None)


def from_megatron(name: str, layer: int | None) -> str:
    """Megatron's key (+ layer index for stacked keys) -> our global parameter name."""
    if layer is None:
        return name
    rest = name[len(LAYERS):]
    return f"{LAYERS}{layer}.{_UNFUSED_NORMS.get(rest, rest)}"


def megatron_order(names: list[str], num_layers: int) -> list[tuple[str, int | None]]:
    """(Megatron key, layer) of the given stacked/plain keys in Megatron's parameter order."""
    present = set(names)
    order = [(n, None) for n in BEFORE_LAYERS if n in present]
    for layer in range(num_layers):
        order += [(LAYERS + n, layer) for n in LAYER_ORDER if LAYERS + n in present]
    order += [(n, None) for n in AFTER_LAYERS if n in present]
    known = {n for n, _ in order}
    missing = sorted(present - known)
    if missing:
        raise KeyError(missing[0])
    return order

"""Parameter-count and theoretical-memory lines printed before the first memory report
(spec §3.5, the core_v0.17 formulas for dense GPT/Llama)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.configs import ModelConfig


@dataclass(frozen=True)
class LayoutInfo:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    num_microbatches: int = 1
    micro_batch_size: int = 1
    seq_length: int = 1
    use_distributed_optimizer: bool = False


def parameter_counts(cfg: ModelConfig) -> dict[str, float]:
    h, n, g = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups
    norm_size = 1 if cfg.normalization == "RMSNorm" else 2
    attn = 2 * h * h * (1 + g / n) * (cfg.kv_channels * n / h)
    mlp = 2 * h * cfg.ffn_hidden_size * (1.5 if cfg.swiglu else 1)
    layernorm = 2 * h * norm_size
    block = cfg.num_layers * (attn + mlp + layernorm) + norm_size * h
    embedding = h * cfg.vocab_size * (2 if cfg.untie_embeddings_and_output_weights else 1)
    return {"block": block, "embedding": embedding, "total": block + embedding}


def theoretical_memory_lines(cfg: ModelConfig, lay: LayoutInfo) -> list[str]:
    counts = parameter_counts(cfg)
    block, embedding = counts["block"], counts["embedding"]
    tied_embedding = cfg.hidden_size * cfg.vocab_size
    most_loaded = (block / lay.pp + tied_embedding) / lay.tp
    if cfg.untie_embeddings_and_output_weights and lay.pp == 1:
        most_loaded += tied_embedding / lay.tp
    lines = [
        f"Number of parameters in transformer block in billions: {block / 1e9: .2f}",
        f"Number of parameters in embedding layers in billions: {embedding / 1e9:.2f}",
        f"Total number of parameters in billions: {counts['total'] / 1e9:.2f}",
        f"Number of parameters in most loaded shard in billions: {most_loaded / 1e9:.4f}",
    ]
    if lay.pp > 1:
        lines.append(f"Number of parameters in other shards in billions: {block / lay.pp / lay.tp / 1e9:.4f}")
    bytes_per_param = 6 + 12 / lay.dp if lay.use_distributed_optimizer else 18
    weight_mb = most_loaded * bytes_per_param / 2**20
    if not (cfg.sequence_parallel and cfg.recompute_granularity == "selective"):
        # spec §3.5: without SP + selective recompute only the weight/optimizer part is printed.
        lines.append(f"Theoretical memory footprints: weight and optimizer={weight_mb:.2f} MB")
        return lines
    S, b, h, V = lay.seq_length, lay.micro_batch_size, cfg.hidden_size, cfg.vocab_size
    act = S * b * h * (18 + 4 * cfg.ffn_hidden_size / h) * cfg.num_layers
    act += 8 * S * b * lay.pp + S * b * h * lay.pp
    if lay.vpp:
        act *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    elif lay.pp > 1:
        act *= min(1, lay.num_microbatches / lay.pp)
    if lay.pp == 1:
        act += S * b * h * 4 * (1 + V / h)
    act_mb = act / lay.tp / 2**20
    lines.append(f"Theoretical memory footprints: weight and optimizer={weight_mb:.2f} MB, "
                 f"activation={act_mb:.2f} MB, total={weight_mb + act_mb:.2f} MB\n")
    return lines

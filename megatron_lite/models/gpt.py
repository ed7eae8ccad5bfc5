"""The decoder-only language model. GPT and Llama are the same class with different config
values (learned positions + LayerNorm + GeLU + biases + tied head vs RoPE + RMSNorm + SwiGLU
+ GQA + untied head). One instance is one pipeline chunk: it may own the embedding
(`pre_process`), the final norm + output layer + loss (`post_process`), and any layers."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config.configs import ModelConfig
from megatron_lite.fused.cross_entropy import fused_vocab_parallel_cross_entropy
from megatron_lite.models.output_loss import ChunkLimits, OutputHead, output_loss
from megatron_lite.models.rope import inverse_frequencies, rotary_cos_sin
from megatron_lite.models.transformer import TransformerBlock
from megatron_lite.tensor_parallel.collectives import split
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.tensor_parallel.embedding import VocabParallelEmbedding
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, linear_with_tp
from megatron_lite.tensor_parallel.sharding import mark_sequence_parallel

TIED_EMBEDDING = "embedding.word_embeddings.weight"


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig, ps, device=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = ps.tp_group, config.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_group=ps.tp_group,
            params_dtype=config.params_dtype, device=device,
            gradient_accumulation_fusion=config.gradient_accumulation_fusion)
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size,
                dtype=config.params_dtype, device=device)
            if config.sequence_parallel:
                # Each TP rank adds the positions of its own sequence chunk (forward), so the
                # table's gradient is a per-chunk partial: summed over TP like a norm's.
                mark_sequence_parallel(self.position_embeddings.weight)

    def forward(self, input_ids, position_ids):  # [b, s] -> [s(/tp with SP), b, h]
        if self.sequence_parallel:
            # The TP sum of the vocabulary shards lands already split by one reduce-scatter
            # (where an all-reduce and a split would move tp times more data), then each rank
            # adds the positions of its chunk. Bit-identical to adding them before the split:
            # for each token one shard holds its row and the others add exact zeros.
            x = self.word_embeddings(input_ids, scatter_sequence=True)  # [s/tp, b, h]
            if self.position_embeddings is not None:
                local = split(position_ids, 1, self.tp_group)  # [b, s/tp]
                x = x + self.position_embeddings(local).transpose(0, 1)  # [s/tp, b, h]
            return x
        x = self.word_embeddings(input_ids)  # [b, s, h]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        return x.transpose(0, 1).contiguous()  # [s, b, h]


class GPTModel(nn.Module):
    def __init__(self, config: ModelConfig, ps, layer_numbers: list[int] | None = None,
                 pre_process: bool = True, post_process: bool = True, rng_tracker=None, device=None):
        super().__init__()
        if config.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError(f"--position-embedding-type {config.position_embedding_type!r} is not "
                             "supported (learned_absolute, rope, none)")
        self.config, self.ps, self.rng_tracker = config, ps, rng_tracker
        self.pre_process, self.post_process = pre_process, post_process
        if layer_numbers is None:
            layer_numbers = list(range(1, config.num_layers + 1))
        self.layer_numbers = list(layer_numbers)
        self.embedding = Embedding(config, ps, device) if pre_process else None
        self.decoder = TransformerBlock(config, ps, self.layer_numbers, final_norm=post_process,
                                        rng_tracker=rng_tracker, device=device)
        self.output_layer = None
        # When the output layer + loss run in sequence chunks (models/output_loss.py); an
        # attribute rather than a config field so tests can force chunking on tiny models.
        self.loss_chunk_limits = ChunkLimits()
        if post_process and (config.untie_embeddings_and_output_weights or not pre_process):
            # Untied head, or the last pipeline stage's copy of the tied embedding (kept equal
            # to the first stage's through the embedding group, spec §5.3).
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.vocab_size, tp_group=ps.tp_group, bias=False,
                sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype, device=device,
                gradient_accumulation_fusion=config.gradient_accumulation_fusion,
                tp_comm_overlap=config.tp_comm_overlap)
            if not config.untie_embeddings_and_output_weights:
                self.output_layer.weight.shared_embedding = True
        if pre_process and not post_process and not config.untie_embeddings_and_output_weights:
            # The first stage's copy is marked too: with the distributed optimizer each copy
            # gets a DP bucket of its own, so both are sharded alike (spec §8.1).
            self.embedding.word_embeddings.weight.shared_embedding = True
        if config.position_embedding_type == "rope":
            rot_dim = int(config.kv_channels * config.rotary_percent)
            self.register_buffer("inv_freq", inverse_frequencies(
                rot_dim, config.rotary_base, config.use_rope_scaling, config.rope_scaling_factor,
            ).to(device), persistent=False)

    # ---- naming ---------------------------------------------------------------------------
    def global_name(self, name: str) -> str:
        """Layout-independent name of a parameter: layer indices are global (0-based) and the
        last stage's tied head is the word embedding. Initialization and checkpoints use it."""
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(self.layer_numbers[int(parts[2])] - 1)
            return ".".join(parts)
        if name == "output_layer.weight" and not self.config.untie_embeddings_and_output_weights:
            return TIED_EMBEDDING
        return name

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def _head_is_tied_lookup(self) -> bool:
        """Whether the head GEMM reads the embedding table of this stage's lookup while both
        accumulate into its `main_grad` (gradient-accumulation fusion): then the head must
        fuse too, since DDP's hook drops what autograd sums for a fused weight."""
        return self.output_layer is None and self.config.gradient_accumulation_fusion

    # ---- forward --------------------------------------------------------------------------
    def _rope(self, position_ids):
        if self.config.position_embedding_type != "rope":
            return None
        cfg = self.config
        return rotary_cos_sin(position_ids, self.inv_freq, cfg.rotary_interleaved,
                              cfg.rotary_seq_len_interpolation_factor, dtype=cfg.params_dtype)

    def embed(self, input_ids, position_ids):  # [b, s] -> [s(/tp), b, h]
        cfg = self.config
        x = self.embedding(input_ids, position_ids)  # [s(/tp), b, h]
        if cfg.fp32_residual_connection:
            x = x.float()
        p = cfg.hidden_dropout if self.training else 0.0
        if p:
            fork = (self.rng_tracker.fork() if cfg.sequence_parallel and self.rng_tracker
                    else contextlib.nullcontext())
            with fork:
                x = F.dropout(x, p)
        return x

    def forward(self, input_ids=None, position_ids=None, labels=None, hidden_states=None):
        """First stage: `input_ids` `[b, s]`; later stages: `hidden_states` `[s(/tp), b, h]`.
        Returns the hidden states (not last stage), per-token loss `[b, s]` fp32 (labels given)
        or vocab-parallel logits `[b, s, V/tp]`."""
        if position_ids is None:
            ref = input_ids if input_ids is not None else labels
            position_ids = torch.arange(ref.shape[1], device=ref.device).expand_as(ref)
        x = self.embed(input_ids, position_ids) if self.pre_process else hidden_states
        x = self.decoder(x, self._rope(position_ids))
        if not self.post_process:
            return x
        x = x.to(self.config.params_dtype)
        if labels is not None:
            cross_entropy = (fused_vocab_parallel_cross_entropy if self.config.cross_entropy_loss_fusion
                             else vocab_parallel_cross_entropy)
            head = OutputHead(self.output_weight(), self.output_layer, self.ps.tp_group,
                              self.config.sequence_parallel, tied_lookup=self._head_is_tied_lookup(),
                              overlap=self.config.tp_comm_overlap)
            # Whole below ChunkLimits' threshold, else in sequence chunks (long sequences).
            return output_loss(x, labels, head, cross_entropy, self.config.label_smoothing,
                               self.loss_chunk_limits)  # [b, s]
        if self.output_layer is not None:
            # Called as a module, so forward pre-hooks see its weight: the overlapped param
            # all-gather of the distributed optimizer waits there (spec §8.3).
            logits = self.output_layer(x)  # [s, b, V/tp]
        else:
            tied = self._head_is_tied_lookup()
            logits = linear_with_tp(x, self.embedding.word_embeddings.weight, None, self.ps.tp_group,
                                    self.config.sequence_parallel, fuse_wgrad=tied,
                                    overlap=self.config.tp_comm_overlap, tied_lookup=tied)  # [s, b, V/tp]
        return logits.transpose(0, 1)


"""Pre-norm transformer layer and the block of layers one model chunk holds, with
activation recomputation (`--recompute-granularity full`, methods uniform/block)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_lite.config.configs import ModelConfig
from megatron_lite.context_parallel.core import RECORD, REPLAY, stash_mode
from megatron_lite.models.attention import SelfAttention
from megatron_lite.models.cuda_graphs import BlockGraphs
from megatron_lite.models.mlp import MLP
from megatron_lite.models.norms import Norm


def make_norm(config: ModelConfig, device=None) -> Norm:
    return Norm(config.hidden_size, config.normalization, config.norm_epsilon,
                zero_centered=config.apply_layernorm_1p, sequence_parallel=config.sequence_parallel,
                dtype=config.params_dtype, device=device, fused=not config.no_persist_layer_norm,
                gradient_accumulation_fusion=config.gradient_accumulation_fusion)


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, ps, layer_number: int, rng_tracker=None, device=None):
        super().__init__()
        self.config, self.rng_tracker = config, rng_tracker
        self.layer_number = layer_number  # 1-based global index, independent of the layout
        self.input_layernorm = make_norm(config, device)
        self.self_attention = SelfAttention(config, ps, rng_tracker, device, layer_number)
        self.pre_mlp_layernorm = make_norm(config, device)
        self.mlp = MLP(config, ps, device)

    def _dropout_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        p = self.config.hidden_dropout if self.training else 0.0
        if not p:
            return residual + x.to(residual.dtype)
        # With sequence parallelism each TP rank holds different tokens, so the mask must come
        # from the per-rank stream; otherwise all TP ranks must draw the same mask.
        fork = (self.rng_tracker.fork() if self.config.sequence_parallel and self.rng_tracker
                else contextlib.nullcontext())
        with fork:
            return residual + F.dropout(x, p).to(residual.dtype)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:  # [s(/tp), b, h]
        dtype = self.config.params_dtype
        # With the fused norms x's two gradients (residual, norm) meet in the norm's backward,
        # and without dropout the residual add and the pre-MLP norm are one kernel each way.
        kept = self.input_layernorm.keep_and_norm(x)
        x, normed = kept if kept is not None else (x, self.input_layernorm(x))
        h = self.self_attention(normed.to(dtype), rope)
        no_dropout = not (self.config.hidden_dropout and self.training)
        fused = self.pre_mlp_layernorm.add_and_norm(h, x) if no_dropout else None
        if fused is not None:
            x, normed = fused
        else:
            x = self._dropout_add(h, x)
            normed = self.pre_mlp_layernorm(x)
        h = self.mlp(normed.to(dtype))
        return self._dropout_add(h, x)


class TransformerBlock(nn.Module):
    """The layers of one model chunk, by their global 1-based numbers, plus the final norm
    when this chunk ends the network."""

    def __init__(self, config: ModelConfig, ps, layer_numbers: list[int], final_norm: bool,
                 rng_tracker=None, device=None):
        super().__init__()
        self.config, self.rng_tracker = config, rng_tracker
        self.layers = nn.ModuleList(
            TransformerLayer(config, ps, n, rng_tracker, device) for n in layer_numbers)
        self.final_layernorm = make_norm(config, device) if final_norm else None
        # --cuda-graph-impl local: captured at the first training forward after
        # enable_cuda_graphs() (the training loop calls it after the warm-up steps).
        self.cuda_graphs_enabled, self.cuda_graphs, self.cuda_graph_slots = False, None, 1

    def enable_cuda_graphs(self, slots: int = 1) -> None:
        """`slots`: micro-batches of this block in flight at once (schedules.in_flight_per_chunk)."""
        self.cuda_graphs_enabled, self.cuda_graph_slots = True, slots

    def _recompute_context(self, layers):
        """(forward context, recompute context) of one checkpoint over `layers`.

        Full recompute re-runs dropout inside TP regions: replay the tracker's states as they
        were at forward time (torch's checkpoint only restores the default generators). With
        `recompute_keeps_attention` the forward records each layer's attention output and the
        recompute replays it instead of attending again (context_parallel/core.py)."""
        tracker = self.rng_tracker
        stashes = [layer.self_attention.stash for layer in layers] \
            if self.config.recompute_keeps_attention and torch.is_grad_enabled() else []
        saved = tracker.state_dict() if tracker is not None else None

        @contextlib.contextmanager
        def replay():
            current = tracker.state_dict() if tracker is not None else None
            if tracker is not None:
                tracker.load_state_dict(saved)
            try:
                with stash_mode(stashes, REPLAY):
                    yield
            finally:
                if tracker is not None:
                    tracker.load_state_dict(current)

        return stash_mode(stashes, RECORD), replay()

    def _run(self, layers, x, rope):
        for layer in layers:
            x = layer(x, rope)
        return x

    def _checkpointed(self, layers, x, rope):
        return checkpoint(self._run, layers, x, rope, use_reentrant=False,
                          context_fn=lambda: self._recompute_context(layers))

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        cfg = self.config
        layers = list(self.layers)
        if cfg.recompute_granularity == "full" and self.training:
            n = cfg.recompute_num_layers or 1
            if cfg.recompute_method == "uniform":
                # Checkpoint the input of every group of n layers; recompute the group in backward.
                for start in range(0, len(layers), n):
                    x = self._checkpointed(layers[start:start + n], x, rope)
            elif cfg.recompute_method == "block":
                # Checkpoint each of the first n layers of this chunk, keep the rest's activations.
                for i, layer in enumerate(layers):
                    x = self._checkpointed([layer], x, rope) if i < n else layer(x, rope)
            else:
                raise ValueError("--recompute-granularity full needs --recompute-method uniform|block")
        elif self.cuda_graphs_enabled and self.training and torch.is_grad_enabled():
            if self.cuda_graphs is None:
                self.cuda_graphs = BlockGraphs.capture(layers, x, rope, self.rng_tracker,
                                                       self.cuda_graph_slots)
            replayed = self.cuda_graphs.run(x, rope)
            # None: more micro-batches in flight than slots (e.g. a larger batch after a
            # --rampup-batch-size step); this one runs eagerly, same numbers.
            x = self._run(layers, x, rope) if replayed is None else replayed
        else:
            x = self._run(layers, x, rope)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x

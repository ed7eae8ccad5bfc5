"""Builds this rank's model chunks from a PipelineLayout: one GPTModel per virtual stage, with
its global layer numbers, the embedding on the first stage and the final norm, output layer
and loss on the last. Parameters are initialized from their global names (models/init.py),
so the tied output weight of the last stage starts equal to the first stage's embedding
without the broadcast of spec §5.3, and any layout starts from the same global weights."""
from __future__ import annotations

from megatron_lite.config.configs import ModelConfig
from megatron_lite.models.gpt import GPTModel
from megatron_lite.models.init import init_model_parameters
from megatron_lite.pipeline_parallel.layout import PipelineLayout


def build_model_chunks(config: ModelConfig, ps, layout: PipelineLayout, seed: int, rng_tracker=None,
                       device=None, cpu_init: bool = False) -> list[GPTModel]:
    """`cpu_init`: --use-cpu-initialization (models/init.py)."""
    if layout.pp_size != ps.pp_size:
        raise ValueError(f"layout for PP {layout.pp_size} used with a pipeline of {ps.pp_size} ranks")
    chunks = []
    for c in range(layout.vpp_size):
        r = ps.pp_rank
        model = GPTModel(config, ps, layer_numbers=layout.layers(r, c), pre_process=layout.is_first(r, c),
                         post_process=layout.is_last(r, c), rng_tracker=rng_tracker, device=device)
        init_model_parameters(model, seed, config.init_method_std, config.num_layers, ps.tp_rank, ps.tp_size,
                              embedding_std=config.embedding_init_method_std, cpu_init=cpu_init)
        chunks.append(model)
    return chunks

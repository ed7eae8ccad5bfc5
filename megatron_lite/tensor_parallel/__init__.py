"""Megatron-style tensor and sequence parallelism: collectives, autograd region boundaries,
parallel linear/embedding layers, vocab-parallel cross-entropy and the sharding rules."""
from megatron_lite.tensor_parallel.collectives import (
    Pending,
    all_gather,
    all_reduce,
    group_rank,
    group_size,
    reduce_scatter,
    split,
)
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.tensor_parallel.embedding import VocabParallelEmbedding
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, linear_with_tp
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megatron_lite.tensor_parallel.sharding import mark_parallel, mark_sequence_parallel, shard, unshard

__all__ = [
    "ColumnParallelLinear",
    "Pending",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_gather",
    "all_reduce",
    "copy_to_tp_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tp_region",
    "group_rank",
    "group_size",
    "linear_with_tp",
    "mark_parallel",
    "mark_sequence_parallel",
    "reduce_from_tp_region",
    "reduce_scatter",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tp_region",
    "shard",
    "split",
    "unshard",
    "vocab_parallel_cross_entropy",
]

"""The language-model head with its loss: output projection `[s, b, h] -> [s, b, V/tp]` and
vocab-parallel cross-entropy, on the whole sequence or in sequence chunks.

Whole: the column-parallel GEMM then the loss, as in Megatron. Its `[s, b, V/tp]` logits, the
fp32 softmax the unfused loss keeps for backward and the logits gradient are all alive at
once: at 128K tokens and a 128K vocabulary the bf16 logits alone are 34 GB.

Chunked: enter the TP region once on the full hidden states (sequence-parallel all-gather, or
the identity whose backward all-reduces), then for each sequence chunk compute logits and loss
under activation checkpointing, so a chunk's logits die right after its loss and backward
recomputes them one chunk at a time. Peak memory is one chunk's logits (plus its softmax and
gradient) instead of the whole sequence's; the price is a second GEMM per chunk in backward
and the gathered `[s, b, h]` input kept for backward (V/h times smaller than the logits).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, linear_with_tp, local_linear
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
)

# `(logits [s, b, V/tp], target [s, b], tp_group, label_smoothing) -> loss [s, b] fp32`
CrossEntropy = Callable[[torch.Tensor, torch.Tensor, object, float], torch.Tensor]


@dataclass(frozen=True)
class ChunkLimits:
    """Logits sizes, in elements of the local `[s, b, V/tp]` tensor, that pick the path.

    Up to `whole_max_elements` (2**30: 2 GB of bf16) the head runs whole, exactly as without
    chunking; above it, in sequence chunks of at most `chunk_max_elements` (2**28: 512 MB of
    bf16, ~3 GB with the unfused loss's fp32 softmax and gradient), big enough that each
    chunk's GEMM still saturates the GPU.
    """

    whole_max_elements: int = 2**30
    chunk_max_elements: int = 2**28


@dataclass(frozen=True)
class OutputHead:
    """The output weight `[V/tp, h]` and how to apply it.

    `layer` is the module owning the weight (untied head, or the last stage's copy of the tied
    embedding); it is called as a module so that its forward pre-hooks (the distributed
    optimizer's overlapped param all-gather, spec §8.3) run before the weight is read. None
    for the tied head on a stage that owns the embedding, whose module already ran this step.
    """

    weight: torch.Tensor
    layer: ColumnParallelLinear | None
    tp_group: object
    sequence_parallel: bool
    # The tied weight of this stage's fused embedding lookup (GPTModel._head_is_tied_lookup):
    # the head's GEMMs accumulate into main_grad too, without a placeholder gradient.
    tied_lookup: bool = False
    # --tp-comm-overlap: a head without a module of its own (layer None) gathers its
    # sequence-parallel input as a collective matmul, as the layers' linears do.
    overlap: bool = False


def sequence_chunk_length(seq_len: int, batch: int, vocab_part: int,
                          limits: ChunkLimits = ChunkLimits()) -> int | None:
    """Sequence positions per chunk for logits `[seq_len, batch, vocab_part]`, or None to run
    whole. Chunks keep all of `batch`, hold at least one position, and are balanced (the
    fewest chunks under the limit, then equal lengths) so the last one is not a sliver."""
    per_position = batch * vocab_part  # logits elements of one sequence position
    if seq_len * per_position <= limits.whole_max_elements:
        return None
    longest = max(1, limits.chunk_max_elements // per_position)
    num_chunks = -(-seq_len // longest)  # ceil
    return -(-seq_len // num_chunks)


def output_loss(x: torch.Tensor, labels: torch.Tensor, head: OutputHead, cross_entropy: CrossEntropy,
                label_smoothing: float, limits: ChunkLimits = ChunkLimits()) -> torch.Tensor:
    """Per-token loss `[b, s]` fp32 of the hidden states x `[s, b, h]` (`[s/tp, b, h]` with
    sequence parallelism) against labels `[b, s]`."""
    target = labels.t()  # [s, b]
    seq_len, batch = target.shape
    chunk_len = sequence_chunk_length(seq_len, batch, head.weight.shape[0], limits)
    if chunk_len is None:
        return _whole_loss(x, target, head, cross_entropy, label_smoothing).t()  # [b, s]

    def chunked(x, weight, bias):
        return _chunked_loss(x, weight, bias, target, head, cross_entropy, label_smoothing, chunk_len)

    if head.layer is not None:
        loss = head.layer(x, consume_weight=chunked)  # [s, b]
    else:
        loss = chunked(x, head.weight, None)  # [s, b]
    return loss.t()  # [b, s]


def _whole_loss(x, target, head: OutputHead, cross_entropy: CrossEntropy, label_smoothing: float):
    if head.layer is not None:
        logits = head.layer(x)  # [s, b, V/tp]
    else:
        logits = linear_with_tp(x, head.weight, None, head.tp_group, head.sequence_parallel,
                                fuse_wgrad=head.tied_lookup, overlap=head.overlap,
                                tied_lookup=head.tied_lookup)  # [s, b, V/tp]
    return cross_entropy(logits, target, head.tp_group, label_smoothing)  # [s, b]


def _chunked_loss(x, weight, bias, target, head: OutputHead, cross_entropy: CrossEntropy,
                  label_smoothing: float, chunk_len: int) -> torch.Tensor:
    """x `[s(/tp), b, h]`, target `[s, b]` -> loss `[s, b]`, one checkpointed chunk at a time."""
    group = head.tp_group
    # The TP-region entry that the column-parallel GEMM does internally, done once here so no
    # chunk runs a collective of its own for the GEMM (the loss still all-reduces per chunk).
    if head.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, group)  # [s/tp, b, h] -> [s, b, h]; bwd reduce-scatter
    else:
        x = copy_to_tp_region(x, group)  # [s, b, h]; bwd all-reduce over tp
    # One split (not per-chunk slicing), so backward concatenates the chunks' input gradients
    # once instead of adding a zero-padded `[s, b, h]` gradient per chunk.
    x_chunks = x.split(chunk_len, dim=0)  # each [c, b, h]
    target_chunks = target.split(chunk_len, dim=0)  # each [c, b]
    losses = []
    for x_c, t_c in zip(x_chunks, target_chunks):
        args = (x_c, weight, bias, t_c, group, cross_entropy, label_smoothing, head.tied_lookup)
        if torch.is_grad_enabled():
            # Non-reentrant: the outer graph stays one graph (one AccumulateGrad per weight,
            # so DDP's grad hooks fire once), and recompute replays chunk by chunk in backward.
            losses.append(checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            losses.append(_chunk_loss(*args))
    return torch.cat(losses, dim=0)  # [s, b]


def _chunk_loss(x_c, weight, bias, t_c, group, cross_entropy: CrossEntropy, label_smoothing: float,
                tied_lookup: bool):
    # [c, b, h] -> [c, b, V/tp], local GEMM, no collective
    logits = local_linear(x_c, weight, bias, fuse_wgrad=tied_lookup, tied_lookup=tied_lookup)
    return cross_entropy(logits, t_c, group, label_smoothing)  # [c, b]

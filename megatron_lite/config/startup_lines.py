"""The lines printed while a run starts (spec §3.1, §3.7): the layout line, the argument dump,
and the padded-vocabulary line with the padding rule behind it."""
from __future__ import annotations

import argparse


def pad_vocab_size(orig: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """spec §3.7: round the vocabulary up to a multiple of divisor x TP, so every TP shard is equal."""
    if orig < 1 or make_vocab_size_divisible_by < 1 or tp < 1:
        raise ValueError(
            f"pad_vocab_size needs positive sizes (got {orig}, {make_vocab_size_divisible_by}, {tp})")
    multiple = make_vocab_size_divisible_by * tp
    return -(-orig // multiple) * multiple


def padded_vocab_line(orig: int, padded: int) -> str:
    """The rank-0 line printed after padding the vocabulary (spec §3.7)."""
    return f" > padded vocab (size: {orig}) with {padded - orig} dummy tokens (new size: {padded})"


def format_args_dump(args: argparse.Namespace, title: str = "arguments") -> str:
    """The rank-0 argument dump of spec §3.1, lines joined by newlines (no trailing newline).

    Each line is two spaces, the name, a space, `48 - len(name)` dots (none for long names), a
    space and `str(value)`; lines are sorted by their lower-cased text, as Megatron does.
    """
    lines = [f"  {name} {'.' * (48 - len(name))} {value}" for name, value in vars(args).items()]
    lines.sort(key=str.lower)
    header = f"{'-' * 24} {title} {'-' * 24}"
    footer = f"{'-' * 20} end of {title} {'-' * 21}"
    return "\n".join([header, *lines, footer])


def world_size_line(args: argparse.Namespace) -> str:
    """The layout line printed during validation (spec §3.1)."""
    return (
        f"using world size: {args.world_size}, data-parallel size: {args.data_parallel_size}, "
        f"context-parallel size: {args.context_parallel_size}, "
        f"hierarchical context-parallel sizes: {args.hierarchical_context_parallel_sizes}, "
        f"tensor-model-parallel size: {args.tensor_model_parallel_size}, "
        f"pipeline-model-parallel size: {args.pipeline_model_parallel_size}"
    )

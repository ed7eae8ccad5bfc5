"""Summarize a `.bin`/`.idx` dataset: file sizes, documents, sequences, tokens, dtype, length
statistics and the first sequences (detokenized when tokenizer flags are given):

    python tools/inspect_dataset.py --data-path data/corpus_text_document \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from megatron_lite.config.tool_args import add_tokenizer_args, tokenizer_config_from_tool_args  # noqa: E402
from megatron_lite.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetError,
    data_file_path,
    index_file_path,
)
from megatron_lite.data.tokenizers import TokenizerError, build_tokenizer  # noqa: E402


def summary(ds: IndexedDataset) -> list[str]:
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    prefix = ds.path_prefix
    lines = [f"dataset:   {prefix}",
             f".bin:      {os.path.getsize(data_file_path(prefix))} bytes",
             f".idx:      {os.path.getsize(index_file_path(prefix))} bytes",
             f"dtype:     {ds.dtype}",
             f"documents: {len(ds.document_indices) - 1}",
             f"sequences: {len(ds)}",
             f"tokens:    {int(lengths.sum())}"]
    if len(lengths):
        lines.append(f"sequence length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="Dataset prefix (without .bin/.idx).")
    parser.add_argument("--samples", type=int, default=3, help="How many leading sequences to show.")
    parser.add_argument("--max-chars", type=int, default=300, help="Cut each shown sequence to this length.")
    parser.add_argument("--multimodal", action="store_true", help="The dataset carries a modes array.")
    add_tokenizer_args(parser)
    args = parser.parse_args(argv)
    try:
        ds = IndexedDataset(args.data_path, multimodal=args.multimodal)
        tokenizer = build_tokenizer(tokenizer_config_from_tool_args(args)) if args.tokenizer_type else None
    except (OSError, IndexedDatasetError, TokenizerError) as e:  # OSError: e.g. an unreadable file
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary(ds)))
    for i in range(min(args.samples, len(ds))):
        ids = ds[i]
        shown = tokenizer.detokenize(ids) if tokenizer else " ".join(map(str, ids.tolist()))
        print(f"--- sequence {i} ({len(ids)} tokens)\n{shown[:args.max_chars]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizer flags shared by the data tools (preprocess, inspect), with the training names
(spec §10), and their conversion to a TokenizerConfig."""
from __future__ import annotations

import argparse

from megatron_lite.data.tokenizers import SUPPORTED_TYPES, TokenizerConfig


def add_tokenizer_args(parser: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=required, default=None, choices=list(SUPPORTED_TYPES))
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json.")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt.")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece / tiktoken / HF tokenizer path.")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer / TikTokenizer vocab size.")
    g.add_argument("--null-tokenizer-eod-id", type=int, default=None,
                   help="NullTokenizer end-of-document id.")
    g.add_argument("--tiktoken-pattern", default=None, help="TikTokenizer pattern: v1 or v2.")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    g.add_argument("--tokenizer-special-tokens", nargs="+", default=None)
    g.add_argument("--trust-remote-code", action="store_true")
    return parser


def tokenizer_config_from_tool_args(args) -> TokenizerConfig:
    special = args.tokenizer_special_tokens
    return TokenizerConfig(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model,
                           args.vocab_size, args.null_tokenizer_eod_id, args.tiktoken_pattern,
                           args.tiktoken_num_special_tokens, tuple(special) if special else None,
                           args.trust_remote_code)

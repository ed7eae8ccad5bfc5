"""Tokenizer flags shared by the data tools (preprocess, inspect), with the training names
(spec §10) and Megatron-LM's full tokenizer group (its preprocess_data.py takes the training
tokenizer flags, spec §1.7), and their conversion to a TokenizerConfig.

Flags that change how text is tokenized work; flags that only concern the model (padding of the
embedding table) or tokenizer features megatron_lite does not have are refused by name in one
line when set, never ignored (DESIGN rule 12).
"""
from __future__ import annotations

import argparse

from megatron_lite.data.tokenizers import SUPPORTED_TYPES, TokenizerConfig, TokenizerError

_NOT_FOR_DATA = "does not apply to tokenizing data"


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("tokenizer")
    # Not required by argparse, as in Megatron-LM; tokenizing text needs it (checked when used).
    g.add_argument("--tokenizer-type", default=None, choices=list(SUPPORTED_TYPES))
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
    g.add_argument("--tokenizer-hf-no-use-fast", action="store_true",
                   help="HuggingFaceTokenizer: load the slow (Python) tokenizer through transformers.")
    g.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_true",
                   help="HuggingFaceTokenizer: encode without the tokenizer's special tokens (e.g. Llama's "
                   "BOS), which are included by default (spec §1.7).")
    _add_model_only_args(g)
    return parser


def _add_model_only_args(g) -> None:
    """Megatron-LM's tokenizer flags that cannot change the tokens written (refused when set)."""
    g.add_argument("--padded-vocab-size", type=int, default=None,
                   help=f"Refused: {_NOT_FOR_DATA} (it sizes the model's embedding table).")
    g.add_argument("--no-pad-vocab-size", "--disable-pad-vocab-size", action="store_false",
                   dest="pad_vocab_size", help=f"Refused: {_NOT_FOR_DATA} (it concerns the embedding table).")
    g.add_argument("--vocab-extra-ids", type=int, default=0,
                   help="Refused unless 0: Megatron-LM's preprocess_data.py fixes it at 0 (spec §1.7).")
    g.add_argument("--null-tokenizer-pad-id", type=int, default=-1,
                   help=f"Refused unless -1: {_NOT_FOR_DATA} (pad ids are never written).")
    g.add_argument("--chat-template", default=None,
                   help=f"Refused: {_NOT_FOR_DATA} (it formats conversations, not plain text).")
    g.add_argument("--tokenizer-metadata", default=None, dest="metadata_path",
                   help="Refused: not supported by megatron_lite (the tokenizer comes from "
                   "--tokenizer-type).")
    g.add_argument("--tokenizer-sentencepiece-legacy", action="store_true",
                   help="Refused: not supported by megatron_lite.")
    g.add_argument("--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
                   "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces", action="store_false",
                   dest="tokenizer_sentencepiece_ignore_extra_whitespaces",
                   help="Refused: not supported by megatron_lite.")
    g.add_argument("--use-gigatoken", action="store_true", help="Refused: not supported by megatron_lite.")


def _refuse_model_only_args(args) -> None:
    refusals = (
        (args.padded_vocab_size is not None, f"--padded-vocab-size {_NOT_FOR_DATA} (it sizes the model's "
         "embedding table: pass it to training)"),
        (not args.pad_vocab_size, f"--no-pad-vocab-size {_NOT_FOR_DATA} (it concerns the model's embedding "
         "table)"),
        (args.vocab_extra_ids != 0, f"--vocab-extra-ids {_NOT_FOR_DATA} (Megatron-LM's preprocess_data.py "
         "fixes it at 0)"),
        (args.null_tokenizer_pad_id != -1, f"--null-tokenizer-pad-id {_NOT_FOR_DATA} (pad ids are never "
         "written)"),
        (args.chat_template is not None, f"--chat-template {_NOT_FOR_DATA} (it formats conversations, not "
         "plain text)"),
        (args.metadata_path is not None, "--tokenizer-metadata is not supported by megatron_lite (its "
         "tokenizer comes from --tokenizer-type)"),
        (args.tokenizer_sentencepiece_legacy, "--tokenizer-sentencepiece-legacy is not supported by "
         "megatron_lite"),
        (not args.tokenizer_sentencepiece_ignore_extra_whitespaces,
         "--no-tokenizer-sentencepiece-ignore-extra-whitespaces is not supported by megatron_lite"),
        (args.use_gigatoken, "--use-gigatoken is not supported by megatron_lite"),
    )
    for refused, message in refusals:
        if refused:
            raise TokenizerError(message)


def tokenizer_config_from_tool_args(args) -> TokenizerConfig:
    """TokenizerError (one line) for a missing --tokenizer-type or a refused flag."""
    if args.tokenizer_type is None:
        raise TokenizerError("--tokenizer-type is needed to tokenize text (one of: "
                             f"{', '.join(SUPPORTED_TYPES)})")
    _refuse_model_only_args(args)
    special = args.tokenizer_special_tokens
    return TokenizerConfig(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model,
                           args.vocab_size, args.null_tokenizer_eod_id, args.tiktoken_pattern,
                           args.tiktoken_num_special_tokens, tuple(special) if special else None,
                           args.trust_remote_code, hf_use_fast=not args.tokenizer_hf_no_use_fast,
                           hf_include_special_tokens=not args.tokenizer_hf_no_include_special_tokens)

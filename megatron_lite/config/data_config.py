"""The argparse namespace -> the frozen data and tokenizer configs (DESIGN rule 2: `args` stops
here). Also reads the blend files of --data-args-path / --per-split-data-args-path."""
from __future__ import annotations

import json

from megatron_lite.config.validation import ConfigError
from megatron_lite.data.builders import DataConfig
from megatron_lite.data.splits import Blend, parse_blend, split_matrix, train_valid_test_num_samples
from megatron_lite.data.tokenizers import TokenizerConfig

# GPT-2's vocabulary: the size mock data uses for GPT2BPETokenizer runs without tokenizer files.
_GPT2_VOCAB = 50257
_FILE_FLAGS = {"GPT2BPETokenizer": ("vocab_file", "merge_file")}


def tokenizer_config_from_args(args) -> TokenizerConfig:
    """With --mock-data and no tokenizer files (spec §2.10 needs only a vocabulary size), the
    tokenizer is a NullTokenizer of --vocab-size (GPT-2's 50257 for GPT2BPETokenizer)."""
    t = args.tokenizer_type
    files = _FILE_FLAGS.get(t, ("tokenizer_model",) if t != "NullTokenizer" else ())
    if args.mock_data and files and all(getattr(args, f) is None for f in files):
        vocab = args.vocab_size or (_GPT2_VOCAB if t == "GPT2BPETokenizer" else None)
        if vocab is None:
            raise ConfigError(f"--tokenizer-type {t} needs --vocab-size for --mock-data runs without "
                              "tokenizer files (e.g. --tokenizer-type NullTokenizer --vocab-size 32000)")
        return TokenizerConfig("NullTokenizer", vocab_size=vocab,
                               null_tokenizer_eod_id=args.null_tokenizer_eod_id)
    special = args.tokenizer_special_tokens
    return TokenizerConfig(
        tokenizer_type=t, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
        null_tokenizer_eod_id=args.null_tokenizer_eod_id, tiktoken_pattern=args.tiktoken_pattern,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
        tokenizer_special_tokens=tuple(special) if special else None,
        trust_remote_code=args.trust_remote_code)


def _read_list(path: str, flag: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None


def _parse_blend(tokens, source: str) -> Blend | None:
    try:
        return parse_blend(tokens)
    except ValueError as e:  # e.g. a NaN weight: name the flag (and file) it came from
        raise ConfigError(f"{source}: {e}") from None


def _blends(args) -> tuple[Blend | None, tuple | None]:
    if args.data_path:
        return _parse_blend(args.data_path, "--data-path"), None
    if args.data_args_path:
        source = f"--data-args-path {args.data_args_path}"
        return _parse_blend(_read_list(args.data_args_path, "--data-args-path"), source), None
    if args.per_split_data_args_path:
        source = f"--per-split-data-args-path {args.per_split_data_args_path}"
        try:
            with open(args.per_split_data_args_path) as f:
                spec = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{source}: {e}") from None
        return None, tuple(_parse_blend(spec.get(k), f"{source} ({k})") for k in ("train", "valid", "test"))
    per_split = {"--train-data-path": args.train_data_path, "--valid-data-path": args.valid_data_path,
                 "--test-data-path": args.test_data_path}
    if any(per_split.values()):
        return None, tuple(_parse_blend(tokens, name) for name, tokens in per_split.items())
    return None, None


def data_config_from_args(args) -> DataConfig:
    blend, per_split = _blends(args)
    if args.split:
        try:
            split_matrix(args.split)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not args.mock_data and blend is None and per_split is None:
        raise ConfigError("no training data: give --data-path (or --train-data-path ...), or --mock-data")
    sizes = train_valid_test_num_samples(
        args.train_iters or 0, args.global_batch_size, args.eval_interval, args.eval_iters,
        args.eval_global_batch_size, train_samples=args.train_samples,
        full_validation=getattr(args, "full_validation", False))
    return DataConfig(
        seq_length=args.seq_length, seed=args.seed, num_samples=sizes,
        micro_batch_size=args.micro_batch_size, eval_micro_batch_size=args.eval_micro_batch_size,
        blend=blend, blend_per_split=per_split, split=args.split, mock=args.mock_data,
        data_cache_path=args.data_cache_path, mmap_bin_files=args.mmap_bin_files,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens, dataloader_type=args.dataloader_type,
        num_workers=args.num_workers, num_dataset_builder_threads=args.num_dataset_builder_threads)

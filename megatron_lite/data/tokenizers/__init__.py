"""Tokenizers built from `--tokenizer-type` and friends, all behind one small interface
(`base.Tokenizer`: tokenize, detokenize, vocab_size, eod, bos, pad)."""
from __future__ import annotations

from megatron_lite.data.tokenizers.base import Tokenizer, TokenizerConfig, TokenizerError

__all__ = ["Tokenizer", "TokenizerConfig", "TokenizerError", "build_tokenizer", "SUPPORTED_TYPES"]

SUPPORTED_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                   "Llama2Tokenizer", "TikTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    t = cfg.tokenizer_type
    if t == "GPT2BPETokenizer":
        from megatron_lite.data.tokenizers.gpt2_bpe import GPT2BPETokenizer
        return GPT2BPETokenizer(cfg.vocab_file, cfg.merge_file)
    if t in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        from megatron_lite.data.tokenizers import sentencepiece
        return getattr(sentencepiece, t)(cfg.tokenizer_model)
    if t == "TikTokenizer":
        from megatron_lite.data.tokenizers.tiktoken_file import TikTokenizer
        return TikTokenizer(cfg.tokenizer_model, cfg.tiktoken_pattern, cfg.vocab_size,
                            cfg.tiktoken_num_special_tokens, cfg.tokenizer_special_tokens)
    if t == "HuggingFaceTokenizer":
        from megatron_lite.data.tokenizers.huggingface import HuggingFaceTokenizer
        return HuggingFaceTokenizer(cfg.tokenizer_model, cfg.trust_remote_code, use_fast=cfg.hf_use_fast,
                                    include_special_tokens=cfg.hf_include_special_tokens)
    if t == "NullTokenizer":
        from megatron_lite.data.tokenizers.null import NullTokenizer
        return NullTokenizer(cfg.vocab_size, cfg.null_tokenizer_eod_id)
    raise TokenizerError(f"--tokenizer-type {t} is not available in megatron_lite "
                         f"(available: {', '.join(SUPPORTED_TYPES)})")

"""TikTokenizer: a local tiktoken BPE vocabulary with reserved special ids (spec §10).

The file is either Megatron's JSON list of `{"rank", "token_bytes" (base64), "token_str"}` or
tiktoken's own `.tiktoken` text format (`base64 rank` per line). The first
`--tiktoken-num-special-tokens` ids are special (`<unk>`, `<s>`, `</s>`, the
`--tokenizer-special-tokens`, then `<SPECIAL_i>` fillers); BPE ranks follow, cut so the whole
vocabulary is `--vocab-size` (default 2^17).
"""
from __future__ import annotations

import base64
import json

from megatron_lite.data.tokenizers.base import TokenizerError, identity, require_file

PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
REQUIRED_SPECIAL = ("<unk>", "<s>", "</s>")


def _read_ranks(path: str, max_vocab: int) -> dict[bytes, int]:
    with open(path, "rb") as f:
        raw = f.read()
    ranks: dict[bytes, int] = {}
    try:
        if raw.lstrip()[:1] == b"[":
            for i, entry in enumerate(json.loads(raw)):
                if entry["rank"] != i:
                    raise ValueError(f"entry {i} has rank {entry['rank']}")
                ranks[base64.b64decode(entry["token_bytes"])] = i
        else:
            for line in raw.splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise TokenizerError(f"--tokenizer-model {path}: not a tiktoken vocabulary ({e})") from None
    if not ranks:  # tiktoken would build an encoder that cannot encode a single byte
        raise TokenizerError(f"--tokenizer-model {path}: not a tiktoken vocabulary (no ranks: an empty file)")
    return {t: r for t, r in ranks.items() if r < max_vocab}


class TikTokenizer:
    def __init__(self, path: str | None, pattern: str | None, vocab_size: int | None,
                 num_special_tokens: int = 1000, special_tokens: tuple[str, ...] | None = None):
        import tiktoken

        self._path = require_file("--tokenizer-model", path, "TikTokenizer")
        if pattern not in PATTERNS:
            raise TokenizerError(f"--tokenizer-type TikTokenizer needs --tiktoken-pattern v1 or v2 "
                                 f"(got {pattern})")
        self._pattern = pattern
        self._vocab_size = vocab_size or 2**17
        specials = list(special_tokens) if special_tokens else list(REQUIRED_SPECIAL)
        missing = [t for t in REQUIRED_SPECIAL if t not in specials]
        if missing or len(set(specials)) != len(specials):
            raise TokenizerError(f"--tokenizer-special-tokens must be unique and include "
                                 f"{list(REQUIRED_SPECIAL)}")
        if not len(specials) <= num_special_tokens < self._vocab_size:
            raise TokenizerError(f"--tiktoken-num-special-tokens ({num_special_tokens}) must be at least "
                                 f"the {len(specials)} special tokens and below the vocabulary size "
                                 f"({self._vocab_size})")
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        self._special = {t: i for i, t in enumerate(specials)}
        ranks = _read_ranks(path, self._vocab_size - num_special_tokens)
        self._num_special = num_special_tokens
        self._enc = tiktoken.Encoding(
            name=f"tiktoken:{path}", pat_str=PATTERNS[pattern],
            mergeable_ranks={t: r + num_special_tokens for t, r in ranks.items()},
            special_tokens=self._special)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._special["</s>"]

    @property
    def bos(self) -> int:
        return self._special["<s>"]

    @property
    def pad(self) -> None:
        return None

    @property
    def unique_identifiers(self) -> dict:
        return identity(self, tokenizer_path=self._path, pattern=self._pattern, vocab_size=self._vocab_size,
                        num_special_tokens=self._num_special, special_tokens=list(self._special)[:3])

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def detokenize(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

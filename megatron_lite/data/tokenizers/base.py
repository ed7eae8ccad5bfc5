"""The one small tokenizer interface every data component uses, its frozen config, and the
file checks that turn a missing or unreadable tokenizer file into a message naming the flag."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class TokenizerError(ValueError):
    """A tokenizer cannot be built; the message names the flag and the path at fault."""


@dataclass(frozen=True)
class TokenizerConfig:
    """What `build_tokenizer` needs; field names are Megatron's argument names (spec §10)."""

    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    null_tokenizer_eod_id: int | None = None
    tiktoken_pattern: str | None = None
    tiktoken_num_special_tokens: int = 1000
    tokenizer_special_tokens: tuple[str, ...] | None = None
    trust_remote_code: bool = False
    # HuggingFaceTokenizer only (Megatron's --tokenizer-hf-no-use-fast / -no-include-special-tokens).
    hf_use_fast: bool = True
    hf_include_special_tokens: bool = True


@runtime_checkable
class Tokenizer(Protocol):
    """tokenize/detokenize plus the ids the data pipeline needs. `bos`/`pad` are None when the
    vocabulary has no such token; `unique_identifiers` names the tokenizer in cache
    descriptions (spec §2.9)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    @property
    def bos(self) -> int | None: ...

    @property
    def pad(self) -> int | None: ...

    @property
    def unique_identifiers(self) -> dict: ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids) -> str: ...


class FixedIds:
    """`vocab_size`/`eod` from `self._vocab_size`/`self._eod`, for vocabularies without BOS or
    PAD tokens."""

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> None:
        return None

    @property
    def pad(self) -> None:
        return None


def require_file(flag: str, path: str | None, tokenizer_type: str) -> str:
    """`path` if it is a readable file, else a TokenizerError naming `flag`."""
    if path is None:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise TokenizerError(f"{flag} {path}: is a directory, expected a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise TokenizerError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    return path


def identity(tokenizer, **fields) -> dict:
    """Unique identifiers in Megatron's shape: class name first, then paths and options."""
    return {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", **fields}

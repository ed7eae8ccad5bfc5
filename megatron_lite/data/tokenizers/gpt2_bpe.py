"""GPT2BPETokenizer: GPT-2 byte-level BPE from a local vocab.json + merges.txt, run by tiktoken.

tiktoken merges by the rank of the merged bytes; the ranks are built here from the merges
file (merge i -> rank 256 + i), so any GPT-2-style pair of files works, and token ids come from
vocab.json (for GPT-2's own files rank == id and no remapping is needed). No download happens:
tiktoken only receives in-memory tables. Text such as "<|endoftext|>" inside a document is
encoded as ordinary text, as Megatron's GPT-2 tokenizer does.
"""
from __future__ import annotations

import json

import numpy as np

from megatron_lite.data.tokenizers.base import FixedIds, TokenizerError, identity, require_file

# GPT-2's pre-tokenization regex, in the possessive form tiktoken publishes as r50k: the same
# splits as the original `'s|'t|...|\s+(?!\S)|\s+` (tests compare both), about 1.7x faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOD_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json and merges.txt."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _read_vocab(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"--vocab-file {path}: not a GPT-2 vocab.json ({e})") from None
    except RecursionError:
        raise TokenizerError(f"--vocab-file {path}: not a GPT-2 vocab.json (nested too deeply)") from None
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"--vocab-file {path}: not a GPT-2 vocab.json (expected a non-empty JSON object "
                             "of token: id)")
    # Ids index the model's embedding, whose size is the entry count: each must be an integer in
    # [0, entries), or the tokenizer would emit ids past the vocabulary it reports.
    for token, i in vocab.items():
        if type(i) is not int or not 0 <= i < len(vocab):
            raise TokenizerError(f"--vocab-file {path}: entry {token[:40]!r} has id {str(i)[:40]}, not an "
                                 f"integer in [0, {len(vocab)}) (the number of entries)")
    return vocab


def _read_merges(path: str) -> list[tuple[int, str, str]]:
    """(line number, left, right) for every merge rule of `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"--merge-file {path}: not a GPT-2 merges.txt ({e})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"--merge-file {path}:{n}: expected two symbols, got {line[:60]!r}")
        merges.append((n, parts[0], parts[1]))
    if not merges:  # byte-level BPE without merges would tokenize every byte alone, silently
        raise TokenizerError(f"--merge-file {path}: no merge rules (an empty or header-only merges.txt)")
    return merges


class GPT2BPETokenizer(FixedIds):
    def __init__(self, vocab_file: str | None, merge_file: str | None):
        import tiktoken

        self._vocab_file = require_file("--vocab-file", vocab_file, "GPT2BPETokenizer")
        self._merge_file = require_file("--merge-file", merge_file, "GPT2BPETokenizer")
        vocab = _read_vocab(vocab_file)
        merges = _read_merges(merge_file)
        if EOD_TOKEN not in vocab:
            raise TokenizerError(f"--vocab-file {vocab_file}: no {EOD_TOKEN} entry")
        self._eod = vocab[EOD_TOKEN]
        self._vocab_size = len(vocab)
        decoder = {c: b for b, c in bytes_to_unicode().items()}

        def to_bytes(symbol: str, where: str) -> bytes:
            try:
                return bytes(decoder[c] for c in symbol)
            except KeyError:
                raise TokenizerError(f"{where}: symbol {symbol!r} is not byte-level BPE") from None

        # Single bytes take their vocab.json order (ranks of single bytes never steer merges).
        byte_ids = {b: vocab.get(c, len(vocab) + b) for b, c in bytes_to_unicode().items()}
        ranks = {bytes([b]): r for r, b in enumerate(sorted(range(256), key=byte_ids.__getitem__))}
        for n, a, b in merges:
            where = f"--merge-file {merge_file}:{n}"
            merged = to_bytes(a, where) + to_bytes(b, where)
            ranks.setdefault(merged, len(ranks))
        # id <-> bytes tables from vocab.json; rank -> id where they differ.
        id_bytes: list[bytes | None] = [None] * (max(vocab.values()) + 1)
        by_bytes = {}
        for token, i in vocab.items():
            where = f"--vocab-file {vocab_file}"
            raw = token.encode("utf-8") if token == EOD_TOKEN else to_bytes(token, where)
            id_bytes[i] = raw
            by_bytes.setdefault(raw, i)
        rank_to_id = np.zeros(len(ranks), np.int64)
        for raw, r in ranks.items():
            if raw not in by_bytes:
                raise TokenizerError(f"--merge-file {merge_file} produces {raw!r}, which --vocab-file "
                                     f"{vocab_file} lacks: the two files do not belong together")
            rank_to_id[r] = by_bytes[raw]
        self._rank_to_id = None if np.array_equal(rank_to_id, np.arange(len(ranks))) else rank_to_id
        self._id_bytes = id_bytes
        self._enc = tiktoken.Encoding(name=f"gpt2bpe:{vocab_file}", pat_str=GPT2_PATTERN,
                                      mergeable_ranks=ranks, special_tokens={})

    @property
    def unique_identifiers(self) -> dict:
        return identity(self, vocab_file=self._vocab_file, merge_file=self._merge_file)

    def tokenize(self, text: str) -> list[int]:
        ids = self._enc.encode_ordinary(text)
        if self._rank_to_id is not None:
            ids = self._rank_to_id[ids].tolist()
        return ids

    def detokenize(self, ids) -> str:
        table = self._id_bytes
        return b"".join(table[int(i)] or b"" for i in ids).decode("utf-8", errors="replace")

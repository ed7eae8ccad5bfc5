"""The SentencePiece family (--tokenizer-model): SentencePieceTokenizer, GPTSentencePieceTokenizer
and Llama2Tokenizer, with Megatron's choice of special ids for each (spec §10)."""
from __future__ import annotations

from megatron_lite.data.tokenizers.base import TokenizerError, identity, require_file


def _load(model_file: str | None, tokenizer_type: str):
    import sentencepiece

    path = require_file("--tokenizer-model", model_file, tokenizer_type)
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"--tokenizer-model {path}: not a SentencePiece model ({e})") from None


def _id_or_none(i: int) -> int | None:
    return i if i >= 0 else None  # SentencePiece reports a disabled special token as -1


class GPTSentencePieceTokenizer:
    """Plain SentencePiece ids; EOD is the model's EOS (no added tokens)."""

    _type = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str | None):
        self._model_file = model_file
        self._sp = _load(model_file, self._type)
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"--tokenizer-model {model_file}: the model has no EOS piece, which "
                                 f"{self._type} uses as end-of-document")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        return _id_or_none(self._sp.bos_id())

    @property
    def pad(self) -> int | None:
        return _id_or_none(self._sp.pad_id())

    @property
    def unique_identifiers(self) -> dict:
        return identity(self, tokenizer_path=self._model_file)

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode_ids([int(i) for i in ids])


class Llama2Tokenizer(GPTSentencePieceTokenizer):
    """Megatron's Llama-2 wrapper: every tokenize() call starts with BOS; EOD is EOS."""

    _type = "Llama2Tokenizer"

    def tokenize(self, text: str) -> list[int]:
        ids = self._sp.encode_as_ids(text)
        return ids if self.bos is None else [self.bos, *ids]


class SentencePieceTokenizer:
    """Megatron's generic wrapper: adds <CLS> <SEP> <EOD> <MASK> (and <PAD>/<BOS>/<EOS> where the
    model lacks them) after the model's pieces; special-token strings in text map to their ids."""

    def __init__(self, model_file: str | None):
        self._model_file = model_file
        self._sp = sp = _load(model_file, "SentencePieceTokenizer")
        self._vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        self._special: dict[str, int] = {}
        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            self._add_special(token)
        self._pad = self._add_special(self._piece_or(sp.pad_id(), "<PAD>"))
        self._bos = self._add_special(self._piece_or(sp.bos_id(), "<BOS>"))
        self._eos = self._add_special(self._piece_or(sp.eos_id(), "<EOS>"))
        self._inv_special = {i: t for t, i in self._special.items()}

    def _piece_or(self, i: int, fallback: str) -> str:
        return self._sp.id_to_piece(i) if 0 <= i < self._sp.get_piece_size() else fallback

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            self._vocab[token] = len(self._vocab)
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._special["<EOD>"]

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> dict:
        return identity(self, tokenizer_path=self._model_file)

    def tokenize(self, text: str) -> list[int]:
        ids, start = [], 0
        while True:
            hits = [(text.find(t, start), t) for t in self._special]
            hits = [(pos, t) for pos, t in hits if pos >= 0]
            if not hits:
                break
            pos, token = min(hits)
            ids.extend(self._sp.encode_as_ids(text[start:pos]))
            ids.append(self._special[token])
            start = pos + len(token)
        ids.extend(self._sp.encode_as_ids(text[start:]))
        return ids

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in ids]
        text, last = "", 0
        for k, i in enumerate(ids):
            if i in self._inv_special:
                text += self._sp.decode_ids(ids[last:k]) + " " + self._inv_special[i] + " "
                last = k + 1
        return text + self._sp.decode_ids(ids[last:])

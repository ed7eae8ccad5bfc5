"""NullTokenizer: no vocabulary file; text is whitespace-separated integer ids (spec §10)."""
from __future__ import annotations

from megatron_lite.data.tokenizers.base import FixedIds, TokenizerError, identity


class NullTokenizer(FixedIds):
    """HEAD semantics (spec §10): vocab_size = --vocab-size, EOD = vocab_size - 1 unless
    --null-tokenizer-eod-id says otherwise, no pad token."""

    def __init__(self, vocab_size: int | None, eod_id: int | None = None):
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError(f"--tokenizer-type NullTokenizer needs a positive --vocab-size "
                                 f"(got {vocab_size})")
        self._vocab_size = int(vocab_size)
        self._eod = self._vocab_size - 1 if eod_id is None else int(eod_id)

    @property
    def unique_identifiers(self) -> dict:
        return identity(self, vocab_size=self._vocab_size, eod_id=self._eod, pad_id=-1)

    def tokenize(self, text: str) -> list[int]:
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer expects whitespace-separated integers, "
                             f"got {text[:40]!r}") from None

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

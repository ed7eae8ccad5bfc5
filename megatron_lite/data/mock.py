"""Synthetic token data. `MockLowLevelDataset` is the low-level dataset behind `--mock-data`
(spec §2.10): 100,000 synthetic sequences.

Sequence i has `length_i` tokens drawn once from `default_rng(0).integers(1, 4096)`: the ids
`1, 2, ..., length_i - 1` (mod the vocabulary) followed by EOD. `MockGPTDataset` wraps it exactly
as GPTDataset wraps a `.bin`/`.idx` pair, so mock runs exercise the real index building and
sample order, and, like them, do not depend on the parallel layout.
"""
from __future__ import annotations

import numpy as np


class MockLowLevelDataset:
    size = 100_000
    max_sequence_length = 4096
    seed = 0

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        rng = np.random.default_rng(seed=self.seed)
        self.sequence_lengths = rng.integers(1, self.max_sequence_length, size=self.size, dtype=np.int32)
        self.path_prefix = None

    def __len__(self) -> int:
        return self.size

    @property
    def fingerprint(self) -> str:
        return f"mock-{self.size}-{self.vocab_size}-{self.eod}"

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        positions = np.arange(offset, offset + length, dtype=np.int64)  # [length] positions in the sequence
        tokens = (positions + 1) % self.vocab_size
        tokens[positions == seq_len - 1] = self.eod  # the last token of every sequence
        return tokens


class MockTokens:
    """Ready-made samples for parity tests that need no dataset machinery (not `--mock-data`):
    sample k is a run of consecutive ids from a start drawn from (seed, k), so it depends only
    on k, never on the parallel layout."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, k: int):
        import torch

        start = np.random.default_rng([self.seed, k]).integers(0, self.vocab_size)
        text = torch.from_numpy((start + np.arange(self.seq_length + 1)) % self.vocab_size)  # [s + 1]
        return {
            "tokens": text[:-1].long(),
            "labels": text[1:].long(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }

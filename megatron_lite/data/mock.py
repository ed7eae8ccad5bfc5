"""Deterministic synthetic token data for `--mock-data` runs before real corpora.

Sample k depends only on (seed, k), never on the parallel layout: each is a run of
consecutive token ids `(start + i) mod vocab` from a random start, so a model can actually
learn it (the loss falls) while every layout sees identical global batches.
"""
from __future__ import annotations

import numpy as np
import torch


class MockTokens:
    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        start = np.random.default_rng([self.seed, k]).integers(0, self.vocab_size)
        text = torch.from_numpy((start + np.arange(self.seq_length + 1)) % self.vocab_size)  # [s + 1]
        return {
            "tokens": text[:-1].long(),
            "labels": text[1:].long(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }

"""GPTDataset: fixed-length training samples cut from a tokenized corpus (spec §2.5-§2.7).

The split's sequences are shuffled epoch by epoch into one token stream, cut into samples of
`seq_length + 1` tokens (consecutive samples share one token), and served in shuffled order.
The three index arrays are built once (`index_builders.py`) and cached as `.npy` files named by
the MD5 of the dataset's description (`index_cache.py`). `MockGPTDataset` is the same over the
synthetic sequences of `mock.py`.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_lite.data.errors import DataError
from megatron_lite.data.index_builders import build_gpt_indices
from megatron_lite.data.index_cache import IndexCache, describe

_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


@dataclass(frozen=True)
class GPTDatasetConfig:
    """Everything a GPTDataset needs besides its documents; frozen, built once in pretrain()."""

    sequence_length: int
    random_seed: int
    eod: int
    pad: int  # -1 when the tokenizer has no usable pad id (spec §2.7)
    tokenizer_identifiers: dict = field(default_factory=dict)
    split: str | None = None
    split_matrix: tuple = ()
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = True
    add_extra_token_to_sequence: bool = True
    drop_last_partial_validation_sequence: bool = True
    path_to_cache: str | None = None
    mmap_bin_files: bool = True
    mid_level_dataset_surplus: float = 0.005
    mock: bool = False
    # Token ids must lie in [0, vocab_size): ids past the tokenizer's vocabulary mean the data was
    # preprocessed with another tokenizer (past the padded vocabulary they crash the embedding).
    # None skips the check. Not part of the cache description: it does not shape the indices.
    vocab_size: int | None = None


def ltor_masks_and_position_ids(tokens: torch.Tensor, eod: int, reset_position_ids: bool,
                                reset_attention_mask: bool, eod_mask_loss: bool,
                                create_attention_mask: bool):
    """(attention_mask [1, s, s] bool True = masked, or None; loss_mask [s]; position_ids [s]).

    spec §2.7: positions restart after every EOD with --reset-position-ids; with
    --reset-attention-mask a position after an EOD at i cannot see positions <= i.
    """
    s = tokens.numel()
    is_eod = tokens == eod  # [s]
    loss_mask = torch.ones(s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    position_ids = torch.arange(s, dtype=torch.long)
    # Document number of each position: EODs strictly before it.
    doc = torch.cumsum(is_eod.long(), 0) - is_eod.long()  # [s]
    if reset_position_ids:
        after_eod = torch.where(is_eod, position_ids + 1, torch.zeros_like(position_ids))
        start = torch.cummax(torch.cat([position_ids.new_zeros(1), after_eod[:-1]]), 0).values  # [s]
        position_ids = position_ids - start
    attention_mask = None
    if create_attention_mask:
        causal = torch.ones(s, s, dtype=torch.bool).tril()  # [s, s] True = visible
        if reset_attention_mask:
            causal &= doc[:, None] == doc[None, :]
        attention_mask = (~causal).unsqueeze(0)  # [1, s, s]
    return attention_mask, loss_mask, position_ids


def _check_cached_shapes(cache: IndexCache, document_index, sample_index, shuffle_index) -> None:
    """Shapes that `build_gpt_indices` always produces; anything else is a damaged cache."""
    if document_index.ndim != 1 or sample_index.ndim != 2 or sample_index.shape[1] != 2 \
            or shuffle_index.ndim != 1 or len(shuffle_index) != len(sample_index) - 1:
        raise DataError(f"{cache.path('sample_index.npy')}: the cached index arrays do not fit together "
                        f"(sample index {sample_index.shape}, shuffle index {shuffle_index.shape}); delete "
                        f"{cache.base}-* in {cache.directory} to rebuild them")


class GPTDataset:
    """`len()` samples; item k is a dict of tokens, labels, loss_mask, position_ids (each [s])
    and, with --reset-attention-mask, attention_mask [1, s, s]."""

    kind = "GPTDataset"

    def __init__(self, low_level, dataset_path: str | None, indices: np.ndarray, num_samples: int | None,
                 split: str, config: GPTDatasetConfig, log: Callable[[str], None] | None = None):
        self.dataset, self.dataset_path, self.indices = low_level, dataset_path, indices
        self.num_samples, self.split, self.config = num_samples, split, config
        self._log = log or (lambda msg: None)
        self.unique_identifiers = OrderedDict([
            ("class", self.kind), ("dataset_path", dataset_path), ("num_samples", num_samples),
            ("index_split", split), ("random_seed", config.random_seed),
            ("sequence_length", config.sequence_length), ("split", config.split),
            ("split_matrix", [list(r) if r is not None else None for r in config.split_matrix]),
            ("tokenizer", config.tokenizer_identifiers),
            # Beyond Megatron's fields (spec §2.9 allows other hashes): what else shapes the indices.
            ("index_range", [int(indices[0]), int(indices[-1]) + 1] if len(indices) else [0, 0]),
            ("add_extra_token_to_sequence", config.add_extra_token_to_sequence),
            ("drop_last_partial_sequence", self._drop_last),
            ("dataset_fingerprint", low_level.fingerprint),
        ])
        self.unique_description, self.unique_description_hash = describe(self.unique_identifiers)
        self.built_anew = False
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build()

    @property
    def _drop_last(self) -> bool:
        return self.split != "valid" or self.config.drop_last_partial_validation_sequence

    def _cache(self) -> IndexCache | None:
        directory = self.config.path_to_cache
        if directory is None:
            if self.config.mock:
                return None  # spec §2.9: mock indices are cached only when a path is given
            directory = os.path.join(self.dataset.path_prefix, "cache", f"{self.kind}_indices")
        return IndexCache(directory, f"{self.unique_description_hash}-{self.kind}-{self.split}")

    def _load_or_build(self):
        cache = self._cache()
        hit = cache.load(_INDEX_NAMES) if cache else None
        if hit is not None:
            self._log(f"Load the {self.kind} {self.split} indices from {cache.directory}")
            arrays = [hit[n] for n in _INDEX_NAMES]
            _check_cached_shapes(cache, *arrays)
        else:
            self._log(f"Build and save the {self.kind} {self.split} indices")
            if len(self.indices) == 0 or int(self.dataset.sequence_lengths[self.indices].sum()) <= 1:
                raise ValueError(f"the {self.split} split of {self.dataset_path or 'the mock dataset'} has "
                                 f"{len(self.indices)} documents and too few tokens for one sample; "
                                 "change --split or add data")
            built = build_gpt_indices(self.indices, self.dataset.sequence_lengths, self.num_samples,
                                      self.config.sequence_length, self.config.random_seed, self._drop_last,
                                      int(self.config.add_extra_token_to_sequence))
            arrays = [built.document_index, built.sample_index, built.shuffle_index]
            self.built_anew = True
            if cache:
                cache.save(self.unique_description, dict(zip(_INDEX_NAMES, arrays)))
            self._log(f"> total number of epochs: {built.num_epochs}")
        self._log(f"> total number of samples: {arrays[1].shape[0] - 1}")
        return arrays

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def text(self, idx: int) -> np.ndarray:
        """The `seq_length + extra` token ids of sample `idx`, right-padded with the pad id."""
        extra = int(self.config.add_extra_token_to_sequence)
        k = int(self.shuffle_index[idx])
        (beg, beg_off), (end, end_off) = self.sample_index[k], self.sample_index[k + 1]
        beg, beg_off, end, end_off = int(beg), int(beg_off), int(end), int(end_off)
        if beg == end:
            parts = [self.dataset.get(int(self.document_index[beg]), beg_off, end_off - beg_off + extra)]
        else:
            parts = [self.dataset.get(int(self.document_index[beg]), beg_off)]
            parts += [self.dataset.get(int(d)) for d in self.document_index[beg + 1:end]]
            parts.append(self.dataset.get(int(self.document_index[end]), 0, end_off + extra))
        want = self.config.sequence_length + extra
        text = np.concatenate(parts).astype(np.int64)
        self._check_token_ids(idx, text, parts)
        if text.size < want:
            text = np.concatenate([text, np.full(want - text.size, self.config.pad, np.int64)])
        return text

    def _check_token_ids(self, idx: int, text: np.ndarray, parts: list[np.ndarray]) -> None:
        """Refuse ids outside [0, vocab_size) naming the dataset, sample and sequence, instead of an
        embedding IndexError without either. Checked per sample as it is read: one vectorized
        reduction over s + 1 ids (microseconds), where a scan of the whole mmap'd `.bin` at startup
        would read gigabytes."""
        vocab = self.config.vocab_size
        # One reduction: viewed as uint64, negative int64 ids are >= 2**63, past any vocabulary.
        if vocab is None or not text.size or int(text.view(np.uint64).max()) < vocab:
            return
        pos = int(np.flatnonzero((text < 0) | (text >= vocab))[0])
        part = int(np.searchsorted(np.cumsum([p.size for p in parts]), pos, side="right"))
        k = int(self.shuffle_index[idx])
        sequence = int(self.document_index[int(self.sample_index[k][0]) + part])
        raise DataError(f"{self.dataset_path or 'the mock dataset'}: sample {idx} of the {self.split} split "
                        f"holds token id {int(text[pos])} (sequence {sequence}), outside the tokenizer's "
                        f"vocabulary [0, {vocab}): was it preprocessed with another tokenizer?")

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.text(idx))  # [s + 1]
        cfg = self.config
        if cfg.add_extra_token_to_sequence:
            tokens, labels = text[:-1].clone(), text[1:].clone()  # [s], [s]
        else:
            tokens, labels = text, torch.roll(text, -1)
            labels[-1] = cfg.pad
        create_mask = cfg.create_attention_mask and cfg.reset_attention_mask
        attention_mask, loss_mask, position_ids = ltor_masks_and_position_ids(
            tokens, cfg.eod, cfg.reset_position_ids, cfg.reset_attention_mask, cfg.eod_mask_loss, create_mask)
        loss_mask[labels == cfg.pad] = 0.0
        tokens[tokens == cfg.pad] = 0  # pad ids must still index the embedding
        labels[labels == cfg.pad] = 0
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        return sample


class MockGPTDataset(GPTDataset):
    """GPTDataset over `mock.MockLowLevelDataset` (spec §2.10); cached under its own class name."""

    kind = "MockGPTDataset"

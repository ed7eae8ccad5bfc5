"""The three GPTDataset index arrays (spec §2.5, §2.6), built with vectorized numpy.

document index: which sequence each position of the shuffled multi-epoch stream holds;
sample index `[n + 1, 2]`: (position in the document index, token offset) where each sample
starts; shuffle index: the order in which samples are served. Megatron builds the sample index
with a C++ loop over documents; here it is one cumulative sum and one binary search, which gives
the same rows (tests compare against a transcription of that loop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class EpochPlan:
    """How many passes over the split's tokens the requested samples need (spec §2.5 steps 1-3)."""

    tokens_per_epoch: int
    num_epochs: int
    separate_final_epoch: bool
    samples_sans_final_epoch: int  # samples drawn from the first E-1 epochs (when separate)


def plan_epochs(tokens_per_epoch: int, num_samples: int | None, seq_length: int, extra: int) -> EpochPlan:
    if tokens_per_epoch <= extra:
        raise ValueError(f"the split holds {tokens_per_epoch} tokens: not enough for one sample")
    if num_samples is None:
        return EpochPlan(tokens_per_epoch, 1, False, 0)
    # Smallest E with E*T >= N*S + extra (spec §2.5 step 2), without a loop.
    needed = num_samples * seq_length + extra
    epochs = max(1, -(-needed // tokens_per_epoch))
    if epochs == 1:
        return EpochPlan(tokens_per_epoch, 1, False, 0)
    sans = ((epochs - 1) * tokens_per_epoch - extra) // seq_length
    from_last = num_samples - sans
    per_epoch = (tokens_per_epoch - extra) // seq_length
    if not 0 <= from_last <= per_epoch + 1:
        raise AssertionError(f"samples from the final epoch ({from_last}) outside [0, {per_epoch + 1}]")
    # spec §2.5 step 3: a final epoch used below 80% is shuffled on its own.
    separate = from_last < int(0.80 * per_epoch)
    return EpochPlan(tokens_per_epoch, epochs, separate, sans)


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """`documents` tiled epoch-major and shuffled in place (spec §2.5 step 5), int32."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)  # [E * docs]
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def num_samples_in_stream(total_tokens: int, seq_length: int, extra: int, drop_last: bool) -> int:
    if drop_last:
        return (total_tokens - extra) // seq_length
    # spec §2.6: the C++ helper divides in single precision.
    return int(math.ceil(np.float32(total_tokens - extra) / np.float32(seq_length)))


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int, drop_last: bool = True,
                       extra: int = 1) -> np.ndarray:
    """Rows (document-index position, offset) where samples start; row n is where the last ends.

    Sample k covers stream tokens [k*S, k*S + S + extra) (consecutive samples share `extra`
    tokens). Row k >= 1 is the first document position whose end reaches k*S + extra, with the
    offset of token k*S in it; this reproduces spec §2.6's walk, including empty documents.
    """
    n = num_samples_in_stream(num_epochs * tokens_per_epoch, seq_length, extra, drop_last)
    doc_lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)  # [D]
    ends = np.cumsum(doc_lengths)  # [D] exclusive end of each position in the token stream
    dtype = np.int32 if max(len(document_index), int(np.max(sequence_lengths, initial=0))) <= _INT32_MAX \
        else np.int64
    index = np.zeros((n + 1, 2), dtype=dtype)  # [n + 1, 2]
    starts = np.arange(1, n + 1, dtype=np.int64) * seq_length  # [n] first token of samples 1..n
    pos = np.searchsorted(ends, starts + extra, side="left")  # [n]
    inside = pos < len(ends)
    index[1:, 0][inside] = pos[inside]
    index[1:, 1][inside] = starts[inside] - (ends[pos[inside]] - doc_lengths[pos[inside]])
    if not inside.all():
        # Only the final partial sample runs past the stream (kept when drop_last is False):
        # the C++ walk parks it at the last document, `extra` tokens before its end.
        if not inside[:-1].all():
            raise AssertionError("sample index ran past the token stream before the last sample")
        last = len(document_index) - 1
        index[-1] = (last, int(doc_lengths[last]) - extra)
    return index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """spec §2.5 step 7: shuffle [0, num_samples) and, separately, [num_samples, total_size)."""
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


@dataclass(frozen=True)
class GPTIndices:
    document_index: np.ndarray  # [E * docs] int32
    sample_index: np.ndarray  # [n + 1, 2]
    shuffle_index: np.ndarray  # [n]
    num_epochs: int


def build_gpt_indices(documents: np.ndarray, sequence_lengths: np.ndarray, num_samples: int | None,
                      seq_length: int, seed: int, drop_last: bool = True, extra: int = 1) -> GPTIndices:
    """All three arrays for one split, with one RandomState in Megatron's order (spec §2.5 step 4)."""
    lengths = np.asarray(sequence_lengths)
    tokens = int(lengths[documents].sum(dtype=np.int64))
    plan = plan_epochs(tokens, num_samples, seq_length, extra)
    rng = np.random.RandomState(seed)
    doc_index = build_document_index(documents, plan.num_epochs, rng, plan.separate_final_epoch)
    sample_index = build_sample_index(lengths, doc_index, seq_length, plan.num_epochs, tokens, drop_last,
                                      extra)
    n = sample_index.shape[0] - 1
    first = plan.samples_sans_final_epoch if plan.separate_final_epoch else n
    shuffle_index = build_shuffle_index(first, n, rng)
    return GPTIndices(doc_index, sample_index, shuffle_index, plan.num_epochs)

"""Blend lists, the `--split` string and requested sample counts (spec §2.1-§2.3): pure functions
from command-line values to what the dataset builder needs."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")
# --split fields: plain decimals ("949", "0.5", ".5") between commas, slashes or spaces.
_SPLIT_SEPARATORS = re.compile(r"\s*[,/]\s*|\s+")
_SPLIT_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


@dataclass(frozen=True)
class Blend:
    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None = None  # None: unweighted (each dataset one epoch)


def parse_blend(tokens: list[str] | None) -> Blend | None:
    """spec §2.2: `[w1] p1 [w2 p2 ...]`. An even count whose even positions all parse as numbers
    is weights + prefixes; anything else is a list of prefixes."""
    if not tokens:
        return None
    tokens = [t.strip() for t in tokens if t.strip()]
    if len(tokens) % 2 == 0:
        try:
            weights = tuple(float(t) for t in tokens[0::2])
        except ValueError:
            weights = None
        if weights is not None:
            # float() also parses "nan" and "inf"; either would turn every normalized weight into NaN.
            bad = [t for t, w in zip(tokens[0::2], weights) if not math.isfinite(w) or w < 0]
            if bad or sum(weights) <= 0:
                raise ValueError(f"blend weights must be finite and non-negative with a positive sum "
                                 f"(got {', '.join(bad or tokens[0::2])})")
            return Blend(tuple(tokens[1::2]), weights)
    return Blend(tuple(tokens))


def parse_split(split: str) -> list[float]:
    """spec §2.3 steps 1-2: numbers out of e.g. "949,50,1" (or "99 1", "98/2"), padded to 3, normalized.

    Megatron pulls every `[.0-9]+` run out of the string, so "1..2" fails inside float() and
    "-1,2" or "1e-3,1" silently become other splits; here the whole string must be up to
    three plain non-negative numbers between separators, or it is refused naming --split.
    """
    fields = _SPLIT_SEPARATORS.split(split.strip())
    if len(fields) > 3 or not all(_SPLIT_NUMBER.fullmatch(f) for f in fields):
        raise ValueError(f"--split {split!r}: expected up to three non-negative numbers separated by commas, "
                         "such as 949,50,1")
    parts = [float(f) for f in fields] + [0.0] * (3 - len(fields))
    if sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: proportions must have a positive sum")
    total = sum(parts)
    return [p / total for p in parts]


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """spec §2.3 step 3: bookends per split; a split with no share is None (not built)."""
    weights = parse_split(split)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def split_indices(bookends: tuple[float, float] | None, num_elements: int) -> np.ndarray | None:
    """spec §2.3 step 4: element ids `[round(start*n), round(end*n))` (Python's banker's round)."""
    if bookends is None:
        return None
    start = int(round(bookends[0] * float(num_elements)))
    end = int(round(bookends[1] * float(num_elements)))
    return np.arange(start, end, dtype=np.int32)


def train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int | None,
                                 eval_iters: int, eval_global_batch_size: int,
                                 train_samples: int | None = None,
                                 full_validation: bool = False) -> tuple[int, int | None, int]:
    """spec §2.1: (train, valid, test) minimum sizes; valid is None with --full-validation."""
    n_train = train_samples if train_samples else train_iters * global_batch_size
    if full_validation:
        n_valid = None
    else:
        points = train_iters // eval_interval + 1 if eval_interval else 1
        n_valid = points * eval_iters * eval_global_batch_size
    return n_train, n_valid, eval_iters * eval_global_batch_size


def target_sizes_lines(sizes: tuple) -> str:
    """The rank-0 block of spec §2.1."""
    train, valid, test = sizes
    return (" > datasets target sizes (minimum size):\n"
            f"    train:      {train}\n"
            f"    validation: {valid}\n"
            f"    test:       {test}")

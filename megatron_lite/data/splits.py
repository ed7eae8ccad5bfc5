"""Blend lists, the `--split` string and requested sample counts (spec §2.1-§2.3): pure functions
from command-line values to what the dataset builder needs."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


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
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"blend weights must be non-negative with a positive sum "
                                 f"(got {list(weights)})")
            return Blend(tuple(tokens[1::2]), weights)
    return Blend(tuple(tokens))


def parse_split(split: str) -> list[float]:
    """spec §2.3 steps 1-2: numbers out of e.g. "949,50,1" (or "99 1"), padded to 3, normalized."""
    parts = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not parts or len(parts) > 3:
        raise ValueError(f"--split {split!r}: expected up to three proportions such as 949,50,1")
    parts += [0.0] * (3 - len(parts))
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: proportions must be non-negative with a positive sum")
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

"""Blending indices of a BlendedDataset (spec §2.8): which dataset, and which of its samples,
serves each position.

The greedy rule (pick the dataset furthest behind its weight, lowest index on ties) is
inherently sequential and is not a divisor method, so it has no closed form to vectorize.
Like Megatron's `helpers.cpp`, it runs as a small C loop (csrc/blending_indices.c), compiled on
first use with the system C compiler and loaded with ctypes; where no compiler exists the same
loop runs in Python (correct, but about 100x slower: fine for test-sized blends).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAX_DATASETS = 32766  # dataset ids are int16 (spec §2.8)

# The C source lives with the project's other native sources (csrc/, DESIGN "Layout").
# A non-editable install has no csrc/: the Python loop runs then.
_C_SOURCE_PATH = Path(__file__).resolve().parents[2] / "csrc" / "blending_indices.c"


def _library_path(source: str) -> Path:
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    candidates = [Path(tempfile.gettempdir()) / "megatron_lite"]
    try:
        candidates.insert(0, Path.home() / ".cache" / "megatron_lite")
    except RuntimeError:  # no home directory
        pass
    for base in candidates:
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base / f"blending_{digest}.so"
        except OSError:
            continue
    raise OSError("no writable cache directory for the compiled blending helper")


def _compile(target: Path, source: str) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "blending.c", Path(tmp) / target.name
        src.write_text(source)
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)], check=True,
                       capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: concurrent ranks never load a half-written library


def _load_helper():
    """The compiled helper, or None (then the Python loop runs)."""
    try:
        source = _C_SOURCE_PATH.read_text()
        path = _library_path(source)
        if not path.exists():
            _compile(path, source)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("blending helper not compiled (%s); using the slower Python loop", e)
        return None
    ptr = np.ctypeslib.ndpointer
    lib.build_blending_indices.argtypes = [ptr(np.int16, flags="C"), ptr(np.int64, flags="C"),
                                           ptr(np.float64, flags="C"), ctypes.c_int32, ctypes.c_int64]
    lib.build_exhaustive_blending_indices.argtypes = [ptr(np.int16, flags="C"), ptr(np.int64, flags="C"),
                                                      ptr(np.int64, flags="C"), ctypes.c_int32]
    return lib


def _check_count(n: int) -> None:
    if not 1 <= n <= MAX_DATASETS:
        raise ValueError(f"a blend needs between 1 and {MAX_DATASETS} datasets (got {n})")


def build_blending_indices(weights, size: int, use_compiled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) for normalized `weights`."""
    w = np.ascontiguousarray(weights, dtype=np.float64)
    _check_count(len(w))
    dataset_index = np.zeros(size, np.int16)
    sample_index = np.zeros(size, np.int64)
    lib = _load_helper() if use_compiled else None
    if lib is not None:
        lib.build_blending_indices(dataset_index, sample_index, w, len(w), size)
        return dataset_index, sample_index
    counts, wl = [0] * len(w), w.tolist()
    for t in range(size):
        td = float(max(t, 1))
        best, best_err = 0, wl[0] * td - counts[0]
        for i in range(1, len(wl)):
            err = wl[i] * td - counts[i]
            if err > best_err:
                best, best_err = i, err
        dataset_index[t], sample_index[t] = best, counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def build_exhaustive_blending_indices(sizes, use_compiled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of every dataset exactly once, interleaved in proportion to the sizes."""
    s = np.ascontiguousarray(sizes, dtype=np.int64)
    _check_count(len(s))
    total = int(s.sum())
    dataset_index = np.zeros(total, np.int16)
    sample_index = np.zeros(total, np.int64)
    lib = _load_helper() if use_compiled else None
    if lib is not None:
        lib.build_exhaustive_blending_indices(dataset_index, sample_index, s, len(s))
        return dataset_index, sample_index
    counts, sl = [0] * len(s), s.tolist()
    for t in range(total):
        td = float(max(t, 1))
        best, best_err = -1, 0.0
        for i, n in enumerate(sl):
            if counts[i] >= n:
                continue
            err = (n / total) * td - counts[i]
            if best < 0 or err > best_err:
                best, best_err = i, err
        dataset_index[t], sample_index[t] = best, counts[best]
        counts[best] += 1
    return dataset_index, sample_index

"""Reader and writer of Megatron's mmap indexed dataset: a `.bin` token stream and its `.idx`
index (spec §1.2-§1.5), byte for byte.

`.idx` layout (little-endian): 9-byte magic `MMIDIDX\\0\\0`, uint64 version 1, uint8 dtype code,
uint64 sequence count S, uint64 document-index length D (= documents + 1), int32 lengths[S],
int64 byte pointers[S], int64 document indices[D], and int8 modes[S] for multimodal data only.
Every inconsistency between header, arrays and `.bin` size is reported with the file name.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from megatron_lite.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # 9 magic + 8 version + 1 dtype + 8 S + 8 D (spec §1.3)
_HEADER = struct.Struct("<9sQBQQ")

# spec §1.3 dtype code table.
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                6: np.float64, 7: np.float32, 8: np.uint16}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
# Token ids are integers: a float code (6, 7) would reinterpret the `.bin` bytes as garbage ids.
TOKEN_CODES = tuple(c for c, t in DTYPE_CODES.items() if np.issubdtype(t, np.integer))


class IndexedDatasetError(DataError):
    """A `.bin`/`.idx` pair that is not a valid Megatron mmap dataset; the message names the file."""


class SequenceRangeError(DataError, IndexError):
    """Tokens asked for outside a sequence (damaged index cache); an IndexError that stays one line
    when a DataLoader worker raises it (see errors.DataError)."""


class DatasetWriteError(OSError):
    """A dataset file cannot be written (read-only directory, full disk); names the file."""


def _write_error(path: str, e: OSError) -> DatasetWriteError:
    return DatasetWriteError(f"cannot write {path} ({e.strerror or e})")


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def optimal_dtype(vocab_size: int) -> type:
    """spec §1.3: uint16 below 65500 (not 65536), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        allowed = sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())
        raise IndexedDatasetError(f"dtype {np.dtype(dtype)} has no code in the .idx format "
                                  f"(allowed: {allowed})") from None


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    sequence_count: int
    document_index_length: int  # number of documents + 1


def _expected_idx_bytes(s: int, d: int, multimodal: bool) -> int:
    return HEADER_BYTES + 4 * s + 8 * s + 8 * d + (s if multimodal else 0)


def read_header(idx_path: str) -> IndexHeader:
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if raw[:len(MAGIC)] != MAGIC and not (size < len(MAGIC) and MAGIC.startswith(raw)):
        if raw.startswith(b"TNTIDX"):
            raise IndexedDatasetError(f"{idx_path}: old 'TNTIDX' cached/lazy format; only the mmap "
                                      "format (magic MMIDIDX) is supported: re-run tools/preprocess_data.py")
        raise IndexedDatasetError(f"{idx_path}: bad magic {raw[:9]!r} (expected {MAGIC!r}): not a Megatron "
                                  "mmap .idx file")
    if size < HEADER_BYTES:
        raise IndexedDatasetError(f"{idx_path}: truncated .idx: {size} bytes, the header alone needs "
                                  f"{HEADER_BYTES}")
    _, version, code, s, d = _HEADER.unpack(raw)
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: unknown .idx version {version} (only {VERSION} exists)")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    if code not in TOKEN_CODES:
        raise IndexedDatasetError(f"{idx_path}: dtype code {code} ({np.dtype(DTYPE_CODES[code])}) is not an "
                                  f"integer token dtype (token datasets use codes {list(TOKEN_CODES)})")
    return IndexHeader(np.dtype(DTYPE_CODES[code]), s, d)


class Index:
    """The arrays of one `.idx` file, memory-mapped, after full validation."""

    def __init__(self, idx_path: str, multimodal: bool = False):
        self.path = idx_path
        header = read_header(idx_path)
        s, d = header.sequence_count, header.document_index_length
        self.dtype = header.dtype
        size = os.path.getsize(idx_path)
        want = _expected_idx_bytes(s, d, multimodal)
        if size != want:
            hint = ""
            if not multimodal and size == want + s:
                hint = " (it looks multimodal: open it with multimodal=True)"
            kind = "truncated .idx" if size < want else "mismatched counts: trailing bytes in .idx"
            raise IndexedDatasetError(f"{idx_path}: {kind}: {size} bytes, but the header's {s} sequences "
                                      f"and {d} document-index entries need {want}{hint}")
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(buf, np.int32, s, off)  # [S]
        off += 4 * s
        self.sequence_pointers = np.frombuffer(buf, np.int64, s, off)  # [S] byte offsets
        off += 8 * s
        self.document_indices = np.frombuffer(buf, np.int64, d, off)  # [D]
        off += 8 * d
        self.sequence_modes = np.frombuffer(buf, np.int8, s, off) if multimodal else None
        self._check_consistency()

    def _check_consistency(self) -> None:
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        s = len(lengths)
        # spec §1.3 invariants: document_indices[0] = 0, non-decreasing, last = S.
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != s:
            first = docs[0] if len(docs) else None
            last = docs[-1] if len(docs) else None
            raise IndexedDatasetError(f"{self.path}: mismatched counts: the document index must run from 0 "
                                      f"to the sequence count {s} (it runs from {first} to {last})")
        if len(docs) > 1 and np.any(docs[1:] < docs[:-1]):
            raise IndexedDatasetError(f"{self.path}: corrupt document index (decreasing entries)")
        if s and np.any(lengths < 0):
            raise IndexedDatasetError(f"{self.path}: corrupt sequence lengths (negative values)")
        expected = np.zeros(s, np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        if s and not np.array_equal(pointers, expected * self.dtype.itemsize):
            raise IndexedDatasetError(f"{self.path}: sequence pointers disagree with the sequence lengths")

    @property
    def total_bytes(self) -> int:
        """Size the `.bin` must have."""
        if not len(self.sequence_lengths):
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize


class IndexedDataset:
    """Sequences of a `.bin`/`.idx` pair (spec §1.3 "Reading"); `len()` is the sequence count."""

    def __init__(self, path_prefix: str, multimodal: bool = False, mmap: bool = True):
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (idx_path, bin_path):
            if os.path.isdir(p):
                raise IndexedDatasetError(f"{p}: is a directory, not a dataset file")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"dataset prefix {path_prefix!r}: {p} does not exist "
                                        "(--data-path takes prefixes such as my-corpus_text_document)")
        self.index = Index(idx_path, multimodal)
        bin_size = os.path.getsize(bin_path)
        if bin_size != self.index.total_bytes:
            short = bin_size < self.index.total_bytes
            kind = "truncated .bin" if short else "mismatched counts: .bin too long"
            raise IndexedDatasetError(f"{bin_path}: {kind}: {bin_size} bytes, but {idx_path} describes "
                                      f"{self.index.total_bytes}")
        self.dtype = self.index.dtype
        self._bin_path, self._mmap = bin_path, mmap
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if mmap and bin_size else None

    def __getstate__(self):
        # Reopen the files on unpickling (DataLoader workers under `spawn`) instead of copying them.
        return self.path_prefix, self.index.sequence_modes is not None, self._mmap

    def __setstate__(self, state):
        self.__init__(*state)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.index.sequence_lengths

    @property
    def sequence_modes(self) -> np.ndarray | None:
        return self.index.sequence_modes

    @property
    def document_indices(self) -> np.ndarray:
        return self.index.document_indices

    def __len__(self) -> int:
        return len(self.index.sequence_lengths)

    @cached_property
    def fingerprint(self) -> str:
        """Content identity for index caches: a re-preprocessed dataset at the same prefix gets
        new caches (spec §2.9 names only the path; stale caches would silently mismatch)."""
        h = hashlib.md5(self.index.sequence_lengths.tobytes())
        h.update(f"{self.dtype}:{len(self.index.document_indices)}".encode())
        return h.hexdigest()

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """`length` tokens of sequence `idx` from token `offset` (default: to its end)."""
        seq_len = int(self.index.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise SequenceRangeError(f"{self.path_prefix}: tokens [{offset}, {offset + length}) out of range "
                                     f"for sequence {idx} of length {seq_len}")
        start = int(self.index.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return self._read(start, length)

    def _read(self, start: int, count: int) -> np.ndarray:
        if count == 0:
            return np.empty(0, self.dtype)
        if self._bin is not None:
            return np.frombuffer(self._bin, self.dtype, count, start)
        want = count * self.dtype.itemsize
        try:
            fd = os.open(self._bin_path, os.O_RDONLY)
            try:
                raw = os.pread(fd, want, start)
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"{self._bin_path}: cannot read bytes [{start}, {start + want}) "
                            f"({e.strerror or e})") from None
        if len(raw) != want:  # the file shrank after it was opened and checked against its .idx
            raise DataError(f"{self._bin_path}: truncated .bin: bytes [{start}, {start + want}) are past "
                            "its end (was it rewritten during training?)")
        return np.frombuffer(raw, self.dtype, count)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices over sequences must be contiguous (step 1)")
            lengths = self.index.sequence_lengths[start:stop]
            if not len(lengths):
                return []
            flat = self._read(int(self.index.sequence_pointers[start]), int(lengths.sum()))
            return np.split(flat, np.cumsum(lengths)[:-1])
        return self.get(int(idx))


def write_index(idx_path: str, dtype, lengths: np.ndarray, document_indices: np.ndarray,
                modes: np.ndarray | None = None) -> None:
    """Write a complete `.idx` (spec §1.3); pointers are recomputed from the lengths."""
    lengths = np.asarray(lengths, dtype=np.int32)
    docs = np.asarray(document_indices, dtype=np.int64)
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, dtype_code(dtype), len(lengths), len(docs)))
        f.write(lengths.astype("<i4", copy=False).tobytes())
        f.write(pointers.astype("<i8", copy=False).tobytes())
        f.write(docs.astype("<i8", copy=False).tobytes())
        if modes is not None:
            f.write(np.asarray(modes, dtype=np.int8).tobytes())


class IndexedDatasetBuilder:
    """Writes `PREFIX.bin` / `PREFIX.idx` with the builder semantics of spec §1.5.

    Interrupted runs never leave an `.idx` that looks complete: tokens go to `PREFIX.bin.partial`,
    any old `PREFIX.idx` is removed first, and `finalize()` renames the `.bin` and then writes the
    `.idx` through a temporary name, so the `.idx` appears last and whole.
    """

    def __init__(self, prefix: str, dtype=np.int32, multimodal: bool = False):
        self.prefix, self.dtype, self.multimodal = prefix, np.dtype(dtype), multimodal
        if dtype_code(self.dtype) not in TOKEN_CODES:
            raise IndexedDatasetError(f"{prefix}: dtype {self.dtype} is not an integer token dtype")
        self._tmp_bin = data_file_path(prefix) + ".partial"
        parent = Path(prefix).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetWriteError(f"cannot create directory {parent} ({e.strerror or e})") from None
        try:
            for stale in (index_file_path(prefix), data_file_path(prefix)):
                if os.path.exists(stale):
                    os.remove(stale)
            self._bin = open(self._tmp_bin, "wb")
        except OSError as e:
            raise _write_error(getattr(e, "filename", None) or self._tmp_bin, e) from None
        self._lengths: list[np.ndarray] = []
        self._docs: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._modes: list[np.ndarray] = []
        self._count = 0  # sequences so far

    def add_item(self, tokens, mode: int = 0) -> None:
        """One sequence (spec §1.5 "add one sequence")."""
        arr = np.asarray(tokens, dtype=self.dtype)
        self._write(arr.tobytes())
        self._lengths.append(np.array([arr.size], np.int32))
        self._modes.append(np.array([mode], np.int8))
        self._count += 1

    def end_document(self) -> None:
        self._docs.append(np.array([self._count], np.int64))

    def add_document(self, tokens, lengths, modes=None) -> None:
        """A whole document: its tokens and per-sequence (sentence) lengths."""
        self.add_documents(tokens, lengths, [len(lengths)], modes)

    def add_documents(self, tokens, lengths, sequences_per_document, modes=None) -> None:
        """Many documents at once: `tokens` concatenated, `lengths[i]` per sequence,
        `sequences_per_document[j]` sequences in document j (0 = an empty document)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        per_doc = np.asarray(sequences_per_document, dtype=np.int64)
        if int(lengths.sum(dtype=np.int64)) != arr.size or int(per_doc.sum()) != lengths.size:
            raise ValueError("add_documents: tokens, lengths and sequences_per_document do not add up")
        self._write(arr.tobytes())
        self._lengths.append(lengths)
        self._modes.append(np.zeros(lengths.size, np.int8) if modes is None else np.asarray(modes, np.int8))
        self._docs.append(self._count + np.cumsum(per_doc))
        self._count += lengths.size

    def add_index(self, other_prefix: str) -> None:
        """Append a whole other dataset (spec §1.5 "append another dataset")."""
        other = Index(index_file_path(other_prefix), self.multimodal)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{other_prefix}: dtype {other.dtype} differs from the output's "
                                      f"{self.dtype}; datasets of different dtypes cannot be merged")
        self._lengths.append(np.array(other.sequence_lengths))
        self._docs.append(self._count + np.array(other.document_indices[1:]))
        modes = other.sequence_modes
        n = len(other.sequence_lengths)
        self._modes.append(np.zeros(n, np.int8) if modes is None else np.array(modes))
        self._count += len(other.sequence_lengths)
        with open(data_file_path(other_prefix), "rb") as src:
            while block := src.read(16 << 20):
                self._write(block)

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as e:  # e.g. a full disk: name the file rather than show a traceback
            raise _write_error(self._tmp_bin, e) from None

    def finalize(self) -> None:
        idx_path = index_file_path(self.prefix)
        tmp_idx = idx_path + ".partial"
        try:
            self._bin.close()
            os.replace(self._tmp_bin, data_file_path(self.prefix))
            write_index(tmp_idx, self.dtype, np.concatenate(self._lengths) if self._lengths else np.zeros(0),
                        np.concatenate(self._docs),
                        np.concatenate(self._modes) if self.multimodal and self._modes else
                        (np.zeros(0, np.int8) if self.multimodal else None))
            os.replace(tmp_idx, idx_path)
        except OSError as e:
            raise _write_error(getattr(e, "filename", None) or tmp_idx, e) from None

    def abort(self) -> None:
        """Drop everything written so far (the output prefix is left without files)."""
        if not self._bin.closed:
            self._bin.close()
        leftovers = [self._tmp_bin, index_file_path(self.prefix) + ".partial"]
        if not os.path.exists(index_file_path(self.prefix)):  # finalize() failed after renaming the .bin
            leftovers.append(data_file_path(self.prefix))
        for p in leftovers:
            if os.path.exists(p):
                os.remove(p)

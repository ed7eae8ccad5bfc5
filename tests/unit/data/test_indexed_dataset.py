"""The `.bin`/`.idx` format (spec §1.3, §1.5) against hand-built bytes, and the reader's
header validation."""
import struct

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    optimal_dtype,
)

CODES = {np.uint16: (8, "H"), np.int32: (4, "i")}


def idx_bytes(code: int, itemsize: int, lengths: list[int], doc_index: list[int]) -> bytes:
    """spec §1.3 written out field by field."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * itemsize
    out += struct.pack(f"<{len(pointers)}q", *pointers)
    out += struct.pack(f"<{len(doc_index)}q", *doc_index)
    return out


def bin_bytes(fmt: str, tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}{fmt}", *tokens)


def write_pair(prefix, idx: bytes, binary: bytes):
    with open(f"{prefix}.idx", "wb") as f:
        f.write(idx)
    with open(f"{prefix}.bin", "wb") as f:
        f.write(binary)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32], ids=["uint16", "int32"])
def test_builder_writes_the_spec_bytes_and_reads_them_back(tmp_path, dtype):
    code, fmt = CODES[dtype]
    itemsize = np.dtype(dtype).itemsize
    prefix = str(tmp_path / "ds")
    b = IndexedDatasetBuilder(prefix, dtype)
    b.add_item([1, 2, 3])
    b.end_document()
    b.add_document([4, 5, 6, 7], [1, 3])  # two sentences
    b.add_document([], [])  # empty document
    b.add_item([65000 if dtype == np.uint16 else 70000])
    b.add_item([9, 9])
    b.end_document()
    b.finalize()
    big = 65000 if dtype == np.uint16 else 70000
    lengths, docs = [3, 1, 3, 1, 2], [0, 1, 3, 3, 5]
    tokens = [1, 2, 3, 4, 5, 6, 7, big, 9, 9]
    assert open(f"{prefix}.idx", "rb").read() == idx_bytes(code, itemsize, lengths, docs)
    assert open(f"{prefix}.bin", "rb").read() == bin_bytes(fmt, tokens)
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == 5
    assert [s.tolist() for s in ds[0:5]] == [[1, 2, 3], [4], [5, 6, 7], [big], [9, 9]]
    assert ds.get(2, offset=1, length=2).tolist() == [6, 7]
    assert ds.document_indices.tolist() == docs
    assert IndexedDataset(prefix, mmap=False).get(4).tolist() == [9, 9]


def test_hand_built_files_read_back(tmp_path):
    prefix = str(tmp_path / "hand")
    write_pair(prefix, idx_bytes(8, 2, [2, 3], [0, 1, 2]), bin_bytes("H", [10, 11, 12, 13, 14]))
    ds = IndexedDataset(prefix)
    assert [ds[0].tolist(), ds[1].tolist()] == [[10, 11], [12, 13, 14]]


def test_optimal_dtype_threshold():
    assert optimal_dtype(50257) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32


def test_append_another_dataset(tmp_path):
    a, b, out = (str(tmp_path / n) for n in ("a", "b", "out"))
    write_pair(a, idx_bytes(4, 4, [2, 1], [0, 1, 2]), bin_bytes("i", [1, 2, 3]))
    write_pair(b, idx_bytes(4, 4, [1, 2], [0, 2]), bin_bytes("i", [4, 5, 6]))
    builder = IndexedDatasetBuilder(out, np.int32)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize()
    # spec §1.5: b's document indices minus the leading 0, shifted by a's 2 sequences.
    assert open(f"{out}.idx", "rb").read() == idx_bytes(4, 4, [2, 1, 1, 2], [0, 1, 2, 4])
    assert open(f"{out}.bin", "rb").read() == bin_bytes("i", [1, 2, 3, 4, 5, 6])
    with pytest.raises(IndexedDatasetError, match="dtype"):
        IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16).add_index(a)


def test_unfinished_builder_leaves_no_index(tmp_path):
    prefix = str(tmp_path / "ds")
    write_pair(prefix, idx_bytes(4, 4, [1], [0, 1]), bin_bytes("i", [7]))  # a stale, complete pair
    b = IndexedDatasetBuilder(prefix, np.int32)
    b.add_item([1, 2])
    assert not (tmp_path / "ds.idx").exists()  # the stale index cannot pair with new tokens
    b.abort()
    assert list(tmp_path.iterdir()) == []


GOOD = idx_bytes(4, 4, [2, 1], [0, 1, 2])


@pytest.mark.parametrize("idx,binary,message", [
    (b"TNTIDX\x00\x00" + GOOD[8:], bin_bytes("i", [1, 2, 3]), "TNTIDX"),
    (b"NOTMAGIC!" + GOOD[9:], bin_bytes("i", [1, 2, 3]), "bad magic"),
    (GOOD[:9] + struct.pack("<Q", 2) + GOOD[17:], bin_bytes("i", [1, 2, 3]), "unknown .idx version 2"),
    (GOOD[:17] + b"\x09" + GOOD[18:], bin_bytes("i", [1, 2, 3]), "unknown dtype code 9"),
    (GOOD[:20], bin_bytes("i", [1, 2, 3]), "truncated .idx"),
    (GOOD[:-4], bin_bytes("i", [1, 2, 3]), "truncated .idx"),
    (GOOD + b"\x00" * 2, bin_bytes("i", [1, 2, 3]), "trailing bytes"),
    (GOOD, bin_bytes("i", [1, 2]), "truncated .bin"),
    (GOOD, bin_bytes("i", [1, 2, 3, 4]), ".bin too long"),
    (idx_bytes(4, 4, [2, 1], [0, 1, 3]), bin_bytes("i", [1, 2, 3]), "mismatched counts"),
    (idx_bytes(4, 4, [2, 1], [0, 2, 1, 2]), bin_bytes("i", [1, 2, 3]), "decreasing"),
], ids=["old-format", "magic", "version", "dtype", "short-header", "short-arrays", "trailing", "short-bin",
        "long-bin", "doc-count", "doc-order"])
def test_header_validation_names_the_problem_and_the_file(tmp_path, idx, binary, message):
    prefix = str(tmp_path / "bad")
    write_pair(prefix, idx, binary)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert "bad." in str(info.value)


def test_missing_files_name_the_prefix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_multimodal_modes_roundtrip(tmp_path):
    prefix = str(tmp_path / "mm")
    b = IndexedDatasetBuilder(prefix, np.int32, multimodal=True)
    b.add_item([1, 2], mode=0)
    b.add_item([3], mode=1)
    b.end_document()
    b.finalize()
    assert open(f"{prefix}.idx", "rb").read() == idx_bytes(4, 4, [2, 1], [0, 2]) + b"\x00\x01"
    assert IndexedDataset(prefix, multimodal=True).sequence_modes.tolist() == [0, 1]
    with pytest.raises(IndexedDatasetError, match="multimodal=True"):
        IndexedDataset(prefix)

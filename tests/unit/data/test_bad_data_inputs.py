"""Catalogue of bad training data (issue 15): every damaged `.bin`/`.idx` pair, out-of-vocabulary
token id and damaged index cache is refused in one line naming the file (and the sample, where
there is one), also when a DataLoader worker finds it. Bad preprocessing inputs are catalogued in
test_bad_preprocess_inputs.py."""
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data.builders import build_data_iterators, build_datasets
from megatron_lite.data.errors import DataError
from megatron_lite.data.indexed_dataset import (
    DatasetWriteError,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
)
from megatron_lite.data.splits import Blend
from tests.unit.data.test_gpt_dataset import EOD, data_config, make_dataset, null_tokenizer
from tests.unit.data.test_indexed_dataset import bin_bytes, idx_bytes, write_pair

ROOT = Path(__file__).resolve().parents[3]
GOOD_IDX = idx_bytes(8, 2, [2, 3], [0, 1, 2])
GOOD_BIN = bin_bytes("H", [10, 11, 12, 13, 14])


def one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


def _pointers_off_by_two(idx: bytes) -> bytes:
    at = 34 + 4 * 2 + 8  # second pointer (header, two int32 lengths, first int64 pointer)
    return idx[:at] + struct.pack("<q", 6) + idx[at + 8:]


# (id, .idx bytes, .bin bytes, file the message must name, what it must say)
PAIRS = [
    ("float32-dtype", idx_bytes(7, 4, [2, 3], [0, 1, 2]), bin_bytes("f", [1.0] * 5), "idx",
     "dtype code 7 (float32) is not an integer token dtype"),
    ("float64-dtype", idx_bytes(6, 8, [2, 3], [0, 1, 2]), bin_bytes("d", [1.0] * 5), "idx",
     "dtype code 6 (float64) is not an integer token dtype"),
    ("unknown-dtype", idx_bytes(9, 2, [2, 3], [0, 1, 2]), GOOD_BIN, "idx", "unknown dtype code 9"),
    ("bad-magic", b"NOTANIDX!" + GOOD_IDX[9:], GOOD_BIN, "idx", "bad magic"),
    ("old-tntidx-format", b"TNTIDX\x00\x00\x00" + GOOD_IDX[9:], GOOD_BIN, "idx", "old 'TNTIDX'"),
    ("version-2", GOOD_IDX[:9] + struct.pack("<Q", 2) + GOOD_IDX[17:], GOOD_BIN, "idx",
     "unknown .idx version 2"),
    ("empty-idx", b"", GOOD_BIN, "idx", "truncated .idx: 0 bytes"),
    ("header-cut", GOOD_IDX[:20], GOOD_BIN, "idx", "truncated .idx: 20 bytes"),
    ("arrays-cut", GOOD_IDX[:-8], GOOD_BIN, "idx", "truncated .idx"),
    ("trailing-bytes", GOOD_IDX + b"\x00\x00\x00", GOOD_BIN, "idx", "trailing bytes in .idx"),
    ("doc-index-short-of-count", idx_bytes(8, 2, [2, 3], [0, 1]), GOOD_BIN, "idx",
     "the document index must run from 0 to the sequence count 2"),
    ("doc-index-decreasing", idx_bytes(8, 2, [2, 3], [0, 2, 1, 2]), GOOD_BIN, "idx", "decreasing entries"),
    ("negative-length", idx_bytes(8, 2, [-1, 3], [0, 1, 2]), GOOD_BIN, "idx", "negative values"),
    ("pointers-disagree", _pointers_off_by_two(GOOD_IDX), GOOD_BIN, "idx",
     "sequence pointers disagree with the sequence lengths"),
    ("bin-truncated", GOOD_IDX, GOOD_BIN[:-2], "bin", "truncated .bin: 8 bytes"),
    ("bin-empty", GOOD_IDX, b"", "bin", "truncated .bin: 0 bytes"),
    ("bin-too-long", GOOD_IDX, GOOD_BIN + b"\x00\x00", "bin", ".bin too long: 12 bytes"),
    ("bin-of-other-dtype", GOOD_IDX, bin_bytes("i", [10, 11, 12, 13, 14]), "bin", ".bin too long: 20 bytes"),
]


@pytest.mark.parametrize("idx,binary,culprit,says", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_damaged_pair_is_refused_naming_the_file(tmp_path, idx, binary, culprit, says):
    prefix = str(tmp_path / "corpus_text_document")
    write_pair(prefix, idx, binary)
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    message = one_line(str(e.value))
    assert message.startswith(f"{prefix}.{culprit}: ") and says in message


@pytest.mark.parametrize("missing", ["bin", "idx"])
def test_missing_half_is_named(tmp_path, missing):
    prefix = str(tmp_path / "corpus")
    write_pair(prefix, GOOD_IDX, GOOD_BIN)
    os.remove(f"{prefix}.{missing}")
    with pytest.raises(FileNotFoundError) as e:
        IndexedDataset(prefix)
    assert f"{prefix}.{missing} does not exist" in one_line(str(e.value))


def test_directory_in_place_of_the_idx_is_named(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_pair(prefix, GOOD_IDX, GOOD_BIN)
    os.remove(f"{prefix}.idx")
    os.mkdir(f"{prefix}.idx")
    with pytest.raises(IndexedDatasetError, match=f"{prefix}.idx: is a directory"):
        IndexedDataset(prefix)


def test_float_dataset_is_refused_by_the_training_builder(tmp_path):
    # What pretrain() calls: the message reaches the user through its `except ValueError`.
    prefix = str(tmp_path / "floats")
    write_pair(prefix, idx_bytes(7, 4, [20] * 3, [0, 1, 2, 3]), bin_bytes("f", [1.5] * 60))
    with pytest.raises(ValueError) as e:
        build_datasets(data_config(blend=Blend((prefix,)), split="1,0,0"), null_tokenizer())
    assert one_line(str(e.value)).startswith(f"{prefix}.idx: dtype code 7 (float32)")


def test_builder_refuses_a_float_dtype(tmp_path):
    with pytest.raises(IndexedDatasetError, match="dtype float32 is not an integer token dtype"):
        IndexedDatasetBuilder(str(tmp_path / "x"), np.float32)
    assert not list(tmp_path.iterdir())


def test_builder_under_a_file_names_the_directory(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(DatasetWriteError) as e:
        IndexedDatasetBuilder(str(tmp_path / "afile" / "corpus"), np.uint16)
    assert one_line(str(e.value)).startswith(f"cannot create directory {tmp_path / 'afile'}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_builder_in_a_read_only_directory_names_the_file(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(DatasetWriteError) as e:
        IndexedDatasetBuilder(str(ro / "corpus"), np.uint16)
    assert one_line(str(e.value)).startswith(f"cannot write {ro / 'corpus'}.bin.partial")


def test_full_disk_while_writing_names_the_file_and_leaves_nothing(tmp_path):
    class FullDisk:
        closed = False

        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True

    prefix = str(tmp_path / "corpus")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b._bin.close()
    b._bin = FullDisk()
    with pytest.raises(DatasetWriteError) as e:
        b.add_document([1, 2, 3], [3])
    assert one_line(str(e.value)) == f"cannot write {prefix}.bin.partial (No space left on device)"
    b.abort()
    assert not list(tmp_path.iterdir())


def test_bin_truncated_after_opening_is_named_on_read(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_pair(prefix, GOOD_IDX, GOOD_BIN)
    ds = IndexedDataset(prefix, mmap=False)  # --no-mmap-bin-files reads with pread
    os.truncate(f"{prefix}.bin", 6)
    with pytest.raises(DataError) as e:
        ds.get(1)
    assert one_line(str(e.value)).startswith(f"{prefix}.bin: truncated .bin: bytes [4, 10)")


def test_read_past_a_sequence_is_an_index_error_naming_the_dataset(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_pair(prefix, GOOD_IDX, GOOD_BIN)
    with pytest.raises(IndexError) as e:
        IndexedDataset(prefix).get(0, 1, 5)
    assert isinstance(e.value, DataError)
    assert one_line(str(e.value)).startswith(f"{prefix}: tokens [1, 6) out of range for sequence 0")


def _dataset_with(path, bad_token: int, dtype=np.uint16, bad_doc: int = 7) -> str:
    b = IndexedDatasetBuilder(str(path), dtype)
    for d in range(20):
        tokens = [(d * 3 + i) % EOD for i in range(10)] + [EOD]
        if d == bad_doc:
            tokens[4] = bad_token
        b.add_document(tokens, [len(tokens)])
    b.finalize()
    return str(path)


def _first_bad_sample(ds) -> tuple[int, str]:
    for i in range(len(ds)):
        try:
            ds[i]
        except DataError as e:
            return i, one_line(str(e))
    raise AssertionError("no sample was refused")


@pytest.mark.parametrize("bad,dtype", [(EOD + 1, np.uint16), (60000, np.uint16), (-5, np.int32)],
                         ids=["vocab-size", "far-past-vocab", "negative"])
def test_out_of_vocabulary_token_names_dataset_sample_and_sequence(tmp_path, bad, dtype):
    prefix = _dataset_with(tmp_path / "corpus_text_document", bad, dtype)
    ds = build_datasets(data_config(blend=Blend((prefix,)), split="1,0,0"), null_tokenizer()).train
    i, message = _first_bad_sample(ds)
    assert message.startswith(f"{prefix}: sample {i} of the train split holds token id {bad} (sequence 7)")
    assert f"vocabulary [0, {EOD + 1})" in message


def test_out_of_vocabulary_token_inside_a_blend_names_its_dataset(tmp_path):
    good = make_dataset(tmp_path / "good")
    bad = _dataset_with(tmp_path / "bad", 1000)
    ds = build_datasets(data_config(blend=Blend((good, bad), (0.5, 0.5)), split="1,0,0",
                                    num_samples=(40, 0, 0)), null_tokenizer()).train
    _, message = _first_bad_sample(ds)
    assert message.startswith(f"{bad}: sample ") and "token id 1000" in message


def test_in_vocabulary_data_passes_the_check(tmp_path):
    prefix = make_dataset(tmp_path / "fine")
    ds = build_datasets(data_config(blend=Blend((prefix,)), split="1,0,0"), null_tokenizer()).train
    assert all(int(ds[i]["tokens"].max()) <= EOD for i in range(len(ds)))


def test_out_of_vocabulary_token_read_by_a_dataloader_worker_stays_one_line(tmp_path):
    prefix = _dataset_with(tmp_path / "corpus", 5000, bad_doc=0)
    cfg = data_config(blend=Blend((prefix,)), split="1,0,0", num_samples=(200, 0, 0), micro_batch_size=64,
                      num_workers=1)
    train = build_data_iterators(cfg, null_tokenizer(), 0, 1).train
    with pytest.raises(DataError) as e:
        for _ in range(4):
            next(train)
    message = one_line(str(e.value))
    assert message.startswith(f"{prefix}: sample ") and "token id 5000 (sequence 0)" in message


def test_dataloader_wrapper_text_is_cut_to_the_original_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\n"
               "Original Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nmegatron_lite.data.errors.DataError: data/x.bin: sample 3 bad\n')
    assert str(DataError(wrapped)) == "data/x.bin: sample 3 bad"
    assert str(IndexedDatasetError("a.idx: bad magic")) == "a.idx: bad magic"


def _built_cache(tmp_path) -> tuple[object, Path]:
    prefix = make_dataset(tmp_path / "corpus")
    cfg = data_config(blend=Blend((prefix,)), split="1,0,0", data_cache_path=str(tmp_path / "cache"))
    build_datasets(cfg, null_tokenizer())
    return cfg, tmp_path / "cache"


class _Plant:
    """Unpickling this creates the marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_pickle_in_the_index_cache_is_refused_without_running(tmp_path):
    cfg, cache = _built_cache(tmp_path)
    target = next(cache.glob("*-document_index.npy"))
    marker = tmp_path / "pwned"
    np.save(target, np.array([_Plant(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as e:
        build_datasets(cfg, null_tokenizer())
    assert one_line(str(e.value)).startswith(f"{target}: unreadable dataset index cache")
    assert not marker.exists()


def test_truncated_index_cache_file_is_named(tmp_path):
    cfg, cache = _built_cache(tmp_path)
    target = next(cache.glob("*-sample_index.npy"))
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(DataError) as e:
        build_datasets(cfg, null_tokenizer())
    assert one_line(str(e.value)).startswith(f"{target}: unreadable dataset index cache")


def test_float_array_in_the_index_cache_is_named(tmp_path):
    cfg, cache = _built_cache(tmp_path)
    target = next(cache.glob("*-shuffle_index.npy"))
    np.save(target, np.zeros(3, np.float32))
    with pytest.raises(DataError, match="not a dataset index array"):
        build_datasets(cfg, null_tokenizer())


def test_index_cache_arrays_that_do_not_fit_are_named(tmp_path):
    cfg, cache = _built_cache(tmp_path)
    target = next(cache.glob("*-shuffle_index.npy"))
    np.save(target, np.load(target)[:-3])
    with pytest.raises(DataError) as e:
        build_datasets(cfg, null_tokenizer())
    assert "the cached index arrays do not fit together" in one_line(str(e.value))


def test_blend_cache_naming_a_missing_dataset_is_named(tmp_path):
    a, b = make_dataset(tmp_path / "a"), make_dataset(tmp_path / "b", n_docs=80, seed=3)
    cfg = data_config(blend=Blend((a, b), (0.3, 0.7)), split="90,10,0", data_cache_path=str(tmp_path / "c"))
    build_datasets(cfg, null_tokenizer())
    target = next((tmp_path / "c").glob("*-BlendedDataset-train-dataset_index.npy"))
    index = np.load(target)
    index[5] = 7
    np.save(target, index)
    with pytest.raises(DataError) as e:
        build_datasets(cfg, null_tokenizer())
    assert one_line(str(e.value)).startswith(f"{target}: damaged train blend indices (they name dataset 7")


def _tool(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *argv], capture_output=True,
                          text=True, timeout=120)


def test_inspect_dataset_refuses_a_float_dataset_in_one_line(tmp_path):
    prefix = str(tmp_path / "floats")
    write_pair(prefix, idx_bytes(7, 4, [2], [0, 1]), bin_bytes("f", [1.0, 2.0]))
    run = _tool("inspect_dataset", "--data-path", prefix)
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout
    assert run.stderr.strip().splitlines() == [
        f"error: {prefix}.idx: dtype code 7 (float32) is not an integer token dtype (token datasets use "
        "codes [1, 2, 3, 4, 5, 8])"]


def test_merge_datasets_with_a_file_as_input_is_one_line(tmp_path):
    (tmp_path / "notadir").write_text("")
    run = _tool("merge_datasets", "--input", str(tmp_path / "notadir"), "--output-prefix",
                str(tmp_path / "o"))
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "notadir" in lines[0]

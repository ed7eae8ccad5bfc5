"""Checkpoint tensor files carry CRC-32 checksums written during the save and verified before
a load: a flipped byte or a truncated file is refused naming the file (and, for files recorded
per segment, the corrupt byte range); intact and older (checksum-less or whole-file-only)
checkpoints load."""
import array
import glob
import io
import json
import os
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_lite.checkpoint.checksums import (
    SUFFIX,
    ChecksumWriter,
    _ChecksumStream,
    first_mismatch,
    recorded,
)
from megatron_lite.checkpoint.layout import WRITER_THREADS, checkpoint_writer

SEG = 1024  # segment size for the multi-segment tests: each ~4 KB tensor file spans several


def _save(path, n=4, segment_bytes=None):
    state = {f"t{i}": torch.randn(1000 + i, generator=torch.Generator().manual_seed(i)) for i in range(n)}
    writer = (checkpoint_writer(str(path)) if segment_bytes is None
              else ChecksumWriter(str(path), segment_bytes=segment_bytes, thread_count=WRITER_THREADS))
    dcp.save(state, storage_writer=writer, no_dist=True)
    return state


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_the_save_records_every_tensor_file(tmp_path):
    _save(tmp_path)
    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*.distcp")))
    sums = recorded(str(tmp_path))
    assert sorted(sums) == files and files
    for name in files:
        assert sums[name]["bytes"] == os.path.getsize(tmp_path / name)
    assert json.loads((tmp_path / f"__0{SUFFIX}").read_text()) == sums
    assert first_mismatch(str(tmp_path)) is None


def test_a_flipped_byte_is_found_and_named(tmp_path):
    _save(tmp_path)
    victim = sorted(glob.glob(str(tmp_path / "*.distcp")))[-1]
    _flip(victim, os.path.getsize(victim) // 2)
    problem = first_mismatch(str(tmp_path))
    assert problem.startswith(f"{victim}: checksum mismatch") and problem.endswith("is corrupted")


def test_a_truncated_or_missing_file_is_named(tmp_path):
    _save(tmp_path)
    files = sorted(glob.glob(str(tmp_path / "*.distcp")))
    with open(files[0], "r+b") as f:
        f.truncate(10)
    expected = f"{tmp_path}: truncated checkpoint: {files[0]} has 10 bytes"
    assert first_mismatch(str(tmp_path)).startswith(expected)
    os.remove(files[0])
    assert first_mismatch(str(tmp_path)) == f"{files[0]}: tensor file is missing"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_files_are_split_over_the_ranks(tmp_path, world):
    _save(tmp_path)
    victim = sorted(recorded(str(tmp_path)))[0]
    with open(tmp_path / victim, "ab") as f:
        f.write(b"x")
    found = [first_mismatch(str(tmp_path), r, world) for r in range(world)]
    assert sum(f is not None for f in found) == 1 and found[0] is not None  # file 0 belongs to rank 0


def test_checkpoints_without_records_load_unverified(tmp_path):
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path), no_dist=True)
    assert recorded(str(tmp_path)) == {} and first_mismatch(str(tmp_path)) is None


def test_odd_sized_writes_crossing_segments_give_exact_segment_crcs():
    data = os.urandom(5 * SEG + 77)
    sizes = [1, SEG - 1, 2 * SEG + 3, 0, 5, SEG + 500, 7]  # straddling, filling, spanning two
    stream, pos = _ChecksumStream(io.BytesIO(), SEG), 0
    for n in sizes + [len(data)]:
        stream.write(data[pos:pos + n])
        pos = min(len(data), pos + n)
    stream.write(memoryview(array.array("d", [1.5, -2.0])))  # a non-byte buffer counts its bytes
    data += array.array("d", [1.5, -2.0]).tobytes()
    record = stream.record()
    assert record["bytes"] == len(data) and record["segment_bytes"] == SEG
    assert record["segments"] == [zlib.crc32(data[i:i + SEG]) for i in range(0, len(data), SEG)]
    assert record["crc32"] == zlib.crc32(data)  # combined from the segments, as older readers need
    assert stream._stream.getvalue() == data


def test_saved_segments_match_the_file_bytes(tmp_path):
    _save(tmp_path, segment_bytes=SEG)
    for name, want in recorded(str(tmp_path)).items():
        data = (tmp_path / name).read_bytes()
        assert len(want["segments"]) > 2 and want["crc32"] == zlib.crc32(data)
        assert want["segments"] == [zlib.crc32(data[i:i + SEG]) for i in range(0, len(data), SEG)]
    assert first_mismatch(str(tmp_path)) is None


@pytest.mark.parametrize("threads", [1, 3, None])
def test_a_corrupt_second_segment_is_found_and_named(tmp_path, threads):
    _save(tmp_path, segment_bytes=SEG)
    victim = sorted(glob.glob(str(tmp_path / "*.distcp")))[-1]
    _flip(victim, SEG + 100)
    count = len(recorded(str(tmp_path))[os.path.basename(victim)]["segments"])
    problem = first_mismatch(str(tmp_path), threads=threads)
    expected = f"{victim}: checksum mismatch in bytes [{SEG}, {2 * SEG}) (segment 2 of {count}) (crc32 "
    assert problem.startswith(expected)
    assert problem.endswith("is corrupted") and "\n" not in problem


def test_of_two_corruptions_the_earliest_is_named_on_one_thread(tmp_path):
    _save(tmp_path, segment_bytes=SEG)
    first, *_, last = sorted(glob.glob(str(tmp_path / "*.distcp")))
    _flip(last, 10)
    _flip(first, 2 * SEG + 10)
    expected = f"{first}: checksum mismatch in bytes [{2 * SEG},"
    assert first_mismatch(str(tmp_path), threads=1).startswith(expected)


def test_a_truncated_multi_segment_file_is_named(tmp_path):
    _save(tmp_path, segment_bytes=SEG)
    victim = sorted(glob.glob(str(tmp_path / "*.distcp")))[1]
    with open(victim, "r+b") as f:
        f.truncate(SEG + 1)
    expected = f"{tmp_path}: truncated checkpoint: {victim} has {SEG + 1} bytes"
    assert first_mismatch(str(tmp_path)).startswith(expected)


def test_old_records_without_segments_still_verify(tmp_path):
    _save(tmp_path, segment_bytes=SEG)
    path = tmp_path / f"__0{SUFFIX}"
    new = json.loads(path.read_text())
    old = {name: {"crc32": r["crc32"], "bytes": r["bytes"]} for name, r in new.items()}
    path.write_text(json.dumps(old))
    assert first_mismatch(str(tmp_path)) is None
    victim = sorted(glob.glob(str(tmp_path / "*.distcp")))[0]
    _flip(victim, SEG + 100)
    problem = first_mismatch(str(tmp_path))
    assert problem.startswith(f"{victim}: checksum mismatch (crc32 ") and problem.endswith("is corrupted")


def test_a_record_whose_segments_do_not_tile_the_file_is_refused(tmp_path):
    _save(tmp_path, segment_bytes=SEG)
    path = tmp_path / f"__0{SUFFIX}"
    record = json.loads(path.read_text())
    name = sorted(record)[0]
    record[name]["segments"].pop()
    path.write_text(json.dumps(record))
    assert "malformed checksum record" in first_mismatch(str(tmp_path))


@pytest.mark.parametrize("text,what", [
    ("{not json", "unreadable checksum record"),
    (b"\xff\xfe{}", "unreadable checksum record"),
    ("[1, 2]", "malformed checksum record"),
    ('{"f.distcp": {"bytes": 4}}', "malformed checksum record"),
    ('{"f.distcp": {"crc32": "x", "bytes": 4}}', "malformed checksum record"),
    ('{"f.distcp": {"crc32": 1, "bytes": 4, "segment_bytes": 4, "segments": "ab"}}',
     "malformed checksum record"),
])
def test_a_damaged_record_file_is_named_in_one_line(tmp_path, text, what):
    """A checksum record that is not what the save writes is refused naming it, no traceback."""
    _save(tmp_path)
    path = tmp_path / f"__0{SUFFIX}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    problem = first_mismatch(str(tmp_path))
    assert problem.startswith(f"{path}: {what}") and "\n" not in problem

"""Checkpoint tensor files carry CRC-32 checksums written during the save and verified before
a load: a flipped byte or a truncated file is refused naming the file; intact and older
(checksum-less) checkpoints load."""
import glob
import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_lite.checkpoint.checksums import SUFFIX, first_mismatch, recorded
from megatron_lite.checkpoint.layout import checkpoint_writer


def _save(path, n=4):
    state = {f"t{i}": torch.randn(1000 + i, generator=torch.Generator().manual_seed(i)) for i in range(n)}
    dcp.save(state, storage_writer=checkpoint_writer(str(path)), no_dist=True)
    return state


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
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
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

"""CRC-32 of every checkpoint tensor file, recorded while it is written and verified before a
load, so a corrupted `.distcp` is refused by name instead of training on garbage.

DCP writes each `.distcp` file front to back from its writer threads (`torch.save` streams
through `write`), so the checksum is folded in as the bytes go out: no second read at save
time (zlib's CRC-32 runs at ~3 GB/s, above the disk). Each rank then writes
`__{rank}.crc32.json` with its own files, before DCP's final gather, so the files exist
before the checkpoint is published. Verification splits the files over the ranks (each file
read once in all), and every rank learns the verdict before anyone starts DCP's load.
Checkpoints without checksum files (older ones, other writers) load unverified.
"""
from __future__ import annotations

import glob
import json
import os
import threading
import zlib
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

SUFFIX = ".crc32.json"
_CHUNK = 64 << 20  # bytes read at a time when verifying


class _ChecksumStream:
    """A write-only file whose CRC-32 and size follow every `write`."""

    def __init__(self, stream):
        self._stream, self.crc, self.size = stream, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self._stream.write(data)

    def seek(self, *args):
        raise OSError("checkpoint tensor files are written front to back; a seek would void the checksum")

    def __getattr__(self, name):  # tell, flush, fileno, close, ...
        return getattr(self._stream, name)


class _ChecksumFileSystem(FileSystem):
    def __init__(self):
        super().__init__()
        self.sums: dict[str, tuple[int, int]] = {}  # file name -> (crc32, size)
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode or not str(path).endswith(".distcp"):
                yield stream
                return
            tracked = _ChecksumStream(stream)
            yield tracked
            with self._lock:
                self.sums[os.path.basename(str(path))] = (tracked.crc, tracked.size)


class ChecksumWriter(FileSystemWriter):
    """DCP's file writer plus this rank's checksum record."""

    def __init__(self, path, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = _ChecksumFileSystem()

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        future.wait()  # the file writer finishes before it returns; make sure of it
        rank = dist.get_rank() if dist.is_initialized() else 0
        record = {name: {"crc32": crc, "bytes": size} for name, (crc, size) in sorted(self.fs.sums.items())}
        tmp = os.path.join(str(self.path), f".__{rank}{SUFFIX}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(str(self.path), f"__{rank}{SUFFIX}"))
        return future


def recorded(directory: str) -> dict[str, dict]:
    """Every file's recorded {crc32, bytes}, from all ranks' records (empty if none)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, f"__*{SUFFIX}"))):
        with open(path) as f:
            out.update(json.load(f))
    return out


def _crc_of(path: str) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return crc, size


def first_mismatch(directory: str, rank: int = 0, world: int = 1) -> str | None:
    """This rank's share of the files (every `world`-th, from `rank`) checked against the
    records: the first problem as one line naming the file, or None."""
    sums = recorded(directory)
    for name in sorted(sums)[rank::world]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{path}: tensor file is missing"
        crc, size = _crc_of(path)
        want = sums[name]
        if size != want["bytes"]:
            return f"{directory}: truncated checkpoint: {path} has {size} bytes, expected {want['bytes']}"
        if crc != want["crc32"]:
            return (f"{path}: checksum mismatch (crc32 {crc:08x}, recorded {want['crc32']:08x}): "
                    "the checkpoint file is corrupted")
    return None


def verify(directory: str, ps) -> str | None:
    """Collective: every rank checks its share; all learn whether any share failed. Returns this
    rank's own finding, a pointer to another rank's, or None when all files are intact."""
    mine = first_mismatch(directory, ps.rank, ps.world_size)
    bad = torch.tensor([1.0 if mine else 0.0])
    groups = [g for g in (ps.mp_group, ps.dp_cp_group) if g is not None]
    if groups and dist.get_backend(groups[0]) == dist.Backend.NCCL:
        bad = bad.cuda()
    for group in groups:  # tp-pp then dp-cp: together the whole world
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if mine or not bad.item():
        return mine
    return f"{directory}: another rank found a corrupted checkpoint file (see its error line)"

"""CRC-32 of every checkpoint tensor file, recorded while it is written and verified before a
load, so a corrupted `.distcp` is refused by name instead of training on garbage.

DCP writes each `.distcp` file front to back from its writer threads (`torch.save` streams
through `write`), so the checksum is folded in as the bytes go out: no second read at save
time. Besides the whole file's CRC, the stream records one CRC per fixed segment of the file's
bytes (`SEGMENT_BYTES`), so verification can read and check the segments in parallel. Each
rank then writes `__{rank}.crc32.json` with its own files, before DCP's final gather, so the
files exist before the checkpoint is published. Verification splits the files over the ranks
(each file read once in all), and every rank learns the verdict before anyone starts DCP's load.
Checkpoints without checksum files (older ones, other writers) load unverified.

Why parallel: zlib.crc32 on one core ran at 0.88 GB/s on the GPU host (17.3 GB Llama-1B
checkpoint: 19.7 s to verify against 11.8 s for DCP's tensor read), below the disk. zlib
releases the GIL on large buffers, so a thread pool over segments is bounded by the disk.
"""
from __future__ import annotations

import glob
import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

SUFFIX = ".crc32.json"
# 256 MiB: large enough that a segment's read runs at disk speed and a 17 GB checkpoint makes
# ~70 tasks (the JSON record stays small), small enough that a few files still spread over 8
# threads. Recorded per file, so a reader never depends on this constant.
SEGMENT_BYTES = 256 << 20
# 16 MiB per read: big enough for full disk throughput and for zlib to release the GIL, small
# enough that 8 threads hold only 128 MiB of buffers just before the model's own load.
_CHUNK = 16 << 20
_MAX_THREADS = 8  # more threads than this only queue on the disk


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector, i = vector >> 1, i + 1
    return out


def _zeros_operator(n: int) -> list[int]:
    """The GF(2) 32x32 matrix that advances a CRC-32 register over `n` zero bytes (zlib's
    crc32_combine, which Python's zlib module does not expose)."""
    op = [0xEDB88320] + [1 << k for k in range(31)]  # one zero bit (reflected polynomial)
    for _ in range(3):  # 1 -> 2 -> 4 -> 8 bits: one zero byte
        op = [_gf2_times(op, col) for col in op]
    result = [1 << k for k in range(32)]  # identity
    while n:
        if n & 1:
            result = [_gf2_times(op, col) for col in result]
        n >>= 1
        if n:
            op = [_gf2_times(op, col) for col in op]
    return result


def whole_crc(segments: list[int], size: int, segment_bytes: int) -> int:
    """The CRC-32 of the whole file from its segments' CRCs: crc(A+B) = Z_len(B)(crc(A)) ^ crc(B),
    where Z advances over zero bytes. Saves a second CRC pass over every written byte."""
    full = _zeros_operator(segment_bytes)
    crc = 0
    for i, seg in enumerate(segments):
        length = min(segment_bytes, size - i * segment_bytes)
        shift = full if length == segment_bytes else _zeros_operator(length)
        crc = _gf2_times(shift, crc) ^ seg
    return crc


class _ChecksumStream:
    """A write-only file whose size and per-segment CRC-32s follow every `write`."""

    def __init__(self, stream, segment_bytes: int = SEGMENT_BYTES):
        self._stream, self._segment_bytes = stream, segment_bytes
        self.size, self.segments = 0, []  # segments: CRCs of the completed segments
        self._crc, self._fill = 0, 0  # the open segment's CRC so far and its byte count

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < view.nbytes:  # writes come in any size: split them at segment boundaries
            take = min(self._segment_bytes - self._fill, view.nbytes - pos)
            self._crc = zlib.crc32(view[pos:pos + take], self._crc)
            self._fill, pos = self._fill + take, pos + take
            if self._fill == self._segment_bytes:
                self.segments.append(self._crc)
                self._crc, self._fill = 0, 0
        self.size += view.nbytes
        return self._stream.write(data)

    def record(self) -> dict:
        """{crc32, bytes, segment_bytes, segments}; crc32 and bytes as older readers expect."""
        segments = self.segments + ([self._crc] if self._fill else [])
        return {"crc32": whole_crc(segments, self.size, self._segment_bytes), "bytes": self.size,
                "segment_bytes": self._segment_bytes, "segments": segments}

    def seek(self, *args):
        raise OSError("checkpoint tensor files are written front to back; a seek would void the checksum")

    def __getattr__(self, name):  # tell, flush, fileno, close, ...
        return getattr(self._stream, name)


class _ChecksumFileSystem(FileSystem):
    def __init__(self, segment_bytes: int):
        super().__init__()
        self.segment_bytes = segment_bytes
        self.sums: dict[str, dict] = {}  # file name -> its record
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode or not str(path).endswith(".distcp"):
                yield stream
                return
            tracked = _ChecksumStream(stream, self.segment_bytes)
            yield tracked
            with self._lock:
                self.sums[os.path.basename(str(path))] = tracked.record()


class ChecksumWriter(FileSystemWriter):
    """DCP's file writer plus this rank's checksum record. `segment_bytes` is a parameter so
    tests can make multi-segment files from small tensors."""

    def __init__(self, path, segment_bytes: int = SEGMENT_BYTES, **kwargs):
        super().__init__(path, **kwargs)
        self.fs = _ChecksumFileSystem(segment_bytes)

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        future.wait()  # the file writer finishes before it returns; make sure of it
        rank = dist.get_rank() if dist.is_initialized() else 0
        record = dict(sorted(self.fs.sums.items()))
        tmp = os.path.join(str(self.path), f".__{rank}{SUFFIX}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(str(self.path), f"__{rank}{SUFFIX}"))
        return future


def recorded(directory: str) -> dict[str, dict]:
    """Every file's recorded {crc32, bytes[, segment_bytes, segments]}, from all ranks' records
    (empty if none)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, f"__*{SUFFIX}"))):
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
            raise ValueError(f"{path}: unreadable checksum record ({e})") from None
        if not isinstance(records, dict) or not all(_well_formed(r) for r in records.values()):
            raise ValueError(f"{path}: malformed checksum record (expected file name -> "
                             "{crc32, bytes[, segment_bytes, segments]} with integer values)")
        out.update(records)
    return out


def _well_formed(record) -> bool:
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(record, dict) or not (count(record.get("crc32")) and count(record.get("bytes"))):
        return False
    if "segments" not in record:
        return True
    segments = record["segments"]
    return (count(record.get("segment_bytes")) and isinstance(segments, list)
            and all(count(c) for c in segments))


@dataclass(frozen=True)
class _Range:
    """One verification task: `length` bytes of `path` from `offset` must have CRC `crc32`.
    `index`/`count` place a segment in its file; None for an older whole-file record."""
    path: str
    offset: int
    length: int
    crc32: int
    index: int | None = None
    count: int | None = None


def _crc_range(path: str, offset: int, length: int) -> int:
    """CRC-32 of a byte range, through its own unbuffered handle so threads never share a
    file position (and readinto fills one reused buffer: no copy per chunk)."""
    crc, done = 0, 0
    view = memoryview(bytearray(max(1, min(_CHUNK, length))))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < length:
            n = f.readinto(view[:min(_CHUNK, length - done)])
            if not n:  # the file shrank after the size check: the CRC will not match
                break
            crc, done = zlib.crc32(view[:n], crc), done + n
    return crc


def _check(task: _Range) -> str | None:
    crc = _crc_range(task.path, task.offset, task.length)
    if crc == task.crc32:
        return None
    where = ""
    if task.index is not None:
        where = (f" in bytes [{task.offset}, {task.offset + task.length})"
                 f" (segment {task.index + 1} of {task.count})")
    return (f"{task.path}: checksum mismatch{where} (crc32 {crc:08x}, recorded {task.crc32:08x}): "
            "the checkpoint file is corrupted")


def _structural_problem(directory: str, path: str, want: dict) -> str | None:
    """A missing or wrongly sized file, or a record whose segments do not tile the file: found
    from the directory and the record alone, before any byte is read."""
    if not os.path.isfile(path):
        return f"{path}: tensor file is missing"
    size = os.path.getsize(path)
    if size != want["bytes"]:
        return f"{directory}: truncated checkpoint: {path} has {size} bytes, expected {want['bytes']}"
    if "segments" in want:
        step, count = want.get("segment_bytes", 0), len(want["segments"])
        if step <= 0 or count != -(-size // step):
            return f"{path}: malformed checksum record ({count} segments of {step} bytes for {size} bytes)"
    return None


def _ranges(path: str, want: dict) -> list[_Range]:
    if "segments" not in want:  # saved before per-segment CRCs: one sequential whole-file task
        return [_Range(path, 0, want["bytes"], want["crc32"])]
    step, segments = want["segment_bytes"], want["segments"]
    return [_Range(path, i * step, min(step, want["bytes"] - i * step), crc, i, len(segments))
            for i, crc in enumerate(segments)]


def default_threads() -> int:
    """Verification threads per rank: min(8, cpu count)."""
    return min(_MAX_THREADS, os.cpu_count() or 1)


def _first_failure(tasks: list[_Range], threads: int) -> str | None:
    """Runs the tasks on a thread pool; on the first failure the tasks not yet started are
    cancelled. Of the failures found, the earliest in task order is reported."""
    if not tasks:
        return None
    with ThreadPoolExecutor(min(threads, len(tasks)), thread_name_prefix="crc32") as pool:
        futures = [pool.submit(_check, task) for task in tasks]
        for future in as_completed(futures):
            if future.result():
                for other in futures:
                    other.cancel()
                break
    found = (f.result() for f in futures if not f.cancelled())
    return next((problem for problem in found if problem), None)


def first_mismatch(directory: str, rank: int = 0, world: int = 1, *,
                   threads: int | None = None) -> str | None:
    """This rank's share of the files (every `world`-th, from `rank`) checked against the
    records: the first problem as one line naming the file, or None. All segments of all the
    share's files are read at once on `threads` threads (default min(8, cpu count))."""
    try:
        sums = recorded(directory)
    except ValueError as e:
        return str(e)
    tasks: list[_Range] = []
    for name in sorted(sums)[rank::world]:
        path = os.path.join(directory, name)
        problem = _structural_problem(directory, path, sums[name])
        if problem:
            return problem
        tasks += _ranges(path, sums[name])
    return _first_failure(tasks, threads or default_threads())


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

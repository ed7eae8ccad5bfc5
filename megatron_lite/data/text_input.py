"""Reading loose-JSON input for preprocessing: plain, `.gz` or `.zst` files, line by line with
line numbers, and JSON decoding that reports the file and line of every bad line."""
from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator


class BadLine(ValueError):
    """A line that is not a usable JSON document; `str()` is `file:line: reason`."""

    def __init__(self, path: str, lineno: int, reason: str):
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.reason = path, lineno, reason


def open_binary(path: str):
    """A binary reader of `path`, decompressing `.gz` and `.zst`/`.zstd` by extension."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise RuntimeError(f"{path}: reading .zst input needs the zstandard package "
                               "(pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def compressed_position(f) -> int | None:
    """Bytes consumed from the file on disk so far (progress against its size), where known:
    plain and gzip input; None for zstd, whose reader reports decompressed positions."""
    inner = getattr(f, "fileobj", None)  # gzip
    if inner is None and isinstance(getattr(f, "raw", None), io.FileIO):
        inner = f.raw
    try:
        return inner.tell() if inner is not None else None
    except (OSError, ValueError):
        return None


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without the newline) for every line of `path`."""
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            yield n, line.rstrip(b"\r\n")


def file_size(path: str) -> int:
    return os.path.getsize(path)


def decode_document(path: str, lineno: int, raw: bytes, keys: tuple[str, ...]) -> dict:
    """The JSON object of one line, with each of `keys` checked to be a string or list of strings."""
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may open the file
    except UnicodeDecodeError as e:
        raise BadLine(path, lineno, f"invalid UTF-8 at byte {e.start}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict):
        raise BadLine(path, lineno, f"expected a JSON object, got {type(doc).__name__}")
    for key in keys:
        if key not in doc:
            raise BadLine(path, lineno, f"missing key {key!r} (--json-keys {' '.join(keys)})")
        value = doc[key]
        is_list = isinstance(value, list) and all(isinstance(s, str) for s in value)
        if not (isinstance(value, str) or is_list):
            raise BadLine(path, lineno, f"key {key!r} holds {type(value).__name__}, not a string or a list "
                                        "of strings")
    return doc

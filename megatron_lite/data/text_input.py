"""Reading loose-JSON input for preprocessing: plain, `.gz` or `.zst` files, line by line with
line numbers, and JSON decoding that reports the file and line of every bad line."""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator


class BadLine(ValueError):
    """A line that is not a usable JSON document; `str()` is `file:line: reason`."""

    def __init__(self, path: str, lineno: int, reason: str):
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.reason = path, lineno, reason


class InputError(ValueError):
    """An input file that cannot be read to its end (unreadable, truncated or corrupt compressed
    data); `str()` is one line naming the file and the last line read. Not skippable: the lines
    after the damage are lost, so `--skip-bad-lines` does not apply."""


def _read_errors() -> tuple[type[BaseException], ...]:
    # gzip raises EOFError for a truncated stream, BadGzipFile (an OSError) for a bad header and
    # zlib.error for corrupt blocks; zstandard has its own ZstdError.
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return errors + (zstandard.ZstdError,)


def input_error(path: str, lineno: int, e: BaseException) -> InputError:
    """The one-line InputError for exception `e` raised after `lineno` complete lines of `path`."""
    where = f"after line {lineno}" if lineno else "before its first line"
    if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):  # the disk, not the data
        return InputError(f"{path}: cannot be read {where} ({e.strerror or e})")
    return InputError(f"{path}: truncated or corrupt compressed input {where} ({e or type(e).__name__})")


def open_binary(path: str):
    """A binary reader of `path`, decompressing `.gz` and `.zst`/`.zstd` by extension."""
    try:
        return _open(path)
    except OSError as e:
        raise InputError(f"{path}: cannot be opened ({e.strerror or e})") from None


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError:
            raise RuntimeError(f"{path}: reading .zst input needs the zstandard package "
                               "(pip install zstandard)") from None
        return io.BufferedReader(ZstdFrames(open(path, "rb"), zstandard.ZstdDecompressor()), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a `.zst` file, frame after frame, raising EOFError when the file
    ends inside a frame: zstandard's own `stream_reader` returns a truncated file's partial
    output as if it were complete, losing its tail silently."""

    def __init__(self, source, dctx):
        self.source, self._dctx = source, dctx
        self._obj = dctx.decompressobj()
        self._out, self._pos = b"", 0
        self._in_frame = False  # bytes of an unfinished frame have been read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos == len(self._out):
            data = self.source.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._decompress(data), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._obj.decompress(data))
            data = b""
            if self._obj.eof:  # a complete frame: any bytes after it start the next one
                data, self._obj, self._in_frame = self._obj.unused_data, self._dctx.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self.source.close()
        super().close()


def compressed_position(f) -> int | None:
    """Bytes consumed from the file on disk so far (progress against its size), where known."""
    inner = getattr(f, "fileobj", None)  # gzip
    raw = getattr(f, "raw", None)
    if inner is None and isinstance(raw, io.FileIO):
        inner = raw
    elif inner is None and isinstance(raw, ZstdFrames):
        inner = raw.source
    try:
        return inner.tell() if inner is not None else None
    except (OSError, ValueError):
        return None


def numbered_lines(f, path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line with its newline) of the open reader `f` of `path`; read
    and decompression errors become one InputError naming the file and the last good line."""
    n = 0
    errors = _read_errors()
    it = iter(f)
    while True:
        try:
            line = next(it)
        except StopIteration:
            return
        except errors as e:
            raise input_error(path, n, e) from None
        n += 1
        yield n, line


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without the newline) for every line of `path`."""
    with open_binary(path) as f:
        for n, line in numbered_lines(f, path):
            yield n, line.rstrip(b"\r\n")


def file_size(path: str) -> int:
    return os.path.getsize(path)


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value) -> str:
    if isinstance(value, list) and not all(isinstance(s, str) for s in value):
        bad = next(s for s in value if not isinstance(s, str))
        return f"an array holding {_JSON_TYPES.get(type(bad), type(bad).__name__)}"
    return _JSON_TYPES.get(type(value), type(value).__name__)


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
    except RecursionError:
        raise BadLine(path, lineno, "JSON nested too deeply to decode") from None
    except ValueError as e:  # e.g. an integer literal past Python's 4300-digit conversion limit
        raise BadLine(path, lineno, f"unusable JSON ({str(e).split(':')[0]})") from None
    if not isinstance(doc, dict):
        raise BadLine(path, lineno, f"expected a JSON object, got {_json_type(doc)}")
    for key in keys:
        if key not in doc:
            raise BadLine(path, lineno, f"missing key {key!r} (--json-keys {' '.join(keys)})")
        value = doc[key]
        is_list = isinstance(value, list) and all(isinstance(s, str) for s in value)
        if not (isinstance(value, str) or is_list):
            raise BadLine(path, lineno, f"key {key!r} holds {_json_type(value)}, not a string or an array "
                                        "of strings")
    return doc

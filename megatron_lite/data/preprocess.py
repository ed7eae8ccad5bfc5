"""Tokenizing one loose-JSON file into `.bin`/`.idx` datasets (spec §1.4, §1.7), in parallel.

A reader thread cuts the input into chunks of lines; worker processes parse and tokenize
whole chunks and return flat numpy arrays; the main process writes them in input order. Chunks
(not single lines, as in Megatron's `imap(chunksize=32)`) keep inter-process traffic small.
Every bad line is reported with file and line number; any failure removes the partial output,
so an interrupted run never leaves an `.idx` behind.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from megatron_lite.data.indexed_dataset import DatasetWriteError, IndexedDatasetBuilder, optimal_dtype
from megatron_lite.data.sentence_split import SentenceSplitter
from megatron_lite.data.text_input import (
    BadLine,
    compressed_position,
    decode_document,
    file_size,
    numbered_lines,
    open_binary,
)
from megatron_lite.data.tokenizers import TokenizerConfig, build_tokenizer

CHUNK_LINES = 512
CHUNK_BYTES = 1 << 20
_WORKER_FAILED, _READER_DONE = -1, -2  # sequence numbers of the two kinds of message that carry no chunk


@dataclass(frozen=True)
class EncodeOptions:
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    skip_bad_lines: bool = False
    punkt_params: object = None  # nltk PunktParameters, with split_sentences


@dataclass
class KeyBatch:
    tokens: np.ndarray  # [T] all tokens of the chunk's documents for this key
    lengths: np.ndarray  # [S] int32 per sequence (sentence)
    per_doc: np.ndarray  # [D] int64 sequences per document


@dataclass
class ChunkResult:
    keys: dict[str, KeyBatch]
    documents: int
    nbytes: int
    tokens: int
    bad_lines: list[str] = field(default_factory=list)
    position: int | None = None  # compressed bytes read when the chunk was cut


class Encoder:
    """Tokenizes documents for every JSON key (one per worker process)."""

    def __init__(self, tokenizer, options: EncodeOptions, dtype, path: str):
        self.tok, self.opts, self.dtype, self.path = tokenizer, options, dtype, path
        self.splitter = SentenceSplitter(options.punkt_params, options.keep_newlines) \
            if options.split_sentences else None
        if options.append_eod and tokenizer.eod is None:
            raise ValueError("--append-eod: the tokenizer has no end-of-document token")

    def encode_text(self, value) -> tuple[list[int], list[int]]:
        """(token ids, per-sentence lengths) of one key of one document (spec §1.7)."""
        if isinstance(value, list):
            sentences = value
        else:
            sentences = self.splitter.split(value) if self.splitter else [value]
        ids: list[int] = []
        lengths: list[int] = []
        for sentence in sentences:
            t = self.tok.tokenize(sentence)
            if t:  # zero-length results are dropped
                ids.extend(t)
                lengths.append(len(t))
        if self.opts.append_eod and lengths:
            ids.append(self.tok.eod)
            lengths[-1] += 1
        return ids, lengths

    def _encode_key(self, doc: dict, key: str, lineno: int) -> tuple[list[int], list[int]]:
        try:
            ids, lengths = self.encode_text(doc[key])
        except ValueError as e:  # e.g. NullTokenizer given words
            raise BadLine(self.path, lineno, f"cannot tokenize key {key!r}: {e}") from None
        vocab = self.tok.vocab_size
        # An id outside the vocabulary (NullTokenizer text such as "70000" or "-1") would be written
        # silently, or wrap around in the uint16 .bin, and break training much later.
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(i for i in ids if i < 0 or i >= vocab)
            raise BadLine(self.path, lineno, f"key {key!r} gives token id {bad}, outside the tokenizer's "
                                             f"vocabulary [0, {vocab})")
        return ids, lengths

    def encode_chunk(self, first_lineno: int, lines: list[bytes]) -> ChunkResult:
        keys = self.opts.json_keys
        acc = {k: ([], [], []) for k in keys}  # ids, lengths, sequences per doc
        docs = nbytes = 0
        bad = []
        for n, raw in enumerate(lines, first_lineno):
            nbytes += len(raw) + 1
            if not raw.strip():
                continue  # blank lines carry no document
            try:
                doc = decode_document(self.path, n, raw, keys)
                encoded = [self._encode_key(doc, k, n) for k in keys]
            except BadLine as e:
                if not self.opts.skip_bad_lines:
                    raise
                bad.append(str(e))
                continue
            for k, (ids, lengths) in zip(keys, encoded):
                acc[k][0].extend(ids)
                acc[k][1].extend(lengths)
                acc[k][2].append(len(lengths))
            docs += 1
        out = {k: KeyBatch(np.array(ids, dtype=self.dtype), np.array(lengths, np.int32),
                           np.array(per, np.int64)) for k, (ids, lengths, per) in acc.items()}
        tokens = sum(b.tokens.size for b in out.values())
        return ChunkResult(out, docs, nbytes, tokens, bad)


def _worker(tok_cfg: TokenizerConfig, options: EncodeOptions, dtype, path: str, tasks, results) -> None:
    where = path
    try:
        encoder = Encoder(build_tokenizer(tok_cfg), options, dtype, path)
        for seq, lineno, lines, position in iter(tasks.get, None):
            where = f"{path}:{lineno}-{lineno + len(lines) - 1}"
            result = encoder.encode_chunk(lineno, lines)
            result.position = position
            results.put((seq, result))
    except BadLine as e:
        results.put((_WORKER_FAILED, ("bad", (e.path, e.lineno, e.reason))))
    except BaseException as e:  # report anything else, in one line, to the main process, which stops the run
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        message = f"{where}: preprocessing worker failed on these lines ({last})"
        results.put((_WORKER_FAILED, ("crash", message)))


def _read_chunks(path: str, tasks, num_workers: int, state: dict, results,
                 max_lines: int | None = None) -> None:
    """Reader thread: numbered chunks of lines into `tasks`, then one stop marker per worker, and
    a wake-up marker into `results` so the main loop sees the final count (or error) at once.
    `max_lines`: stop after that many lines (documents; --max-documents)."""
    seq = 0
    try:
        with open_binary(path) as f:
            lines, size, first = [], 0, 1
            for n, line in numbered_lines(f, path):
                if max_lines is not None and n > max_lines:
                    break
                lines.append(line.rstrip(b"\r\n"))
                size += len(line)
                if len(lines) >= CHUNK_LINES or size >= CHUNK_BYTES:
                    tasks.put((seq, first, lines, compressed_position(f)))
                    seq, lines, size, first = seq + 1, [], 0, n + 1
            if lines:
                tasks.put((seq, first, lines, compressed_position(f)))
                seq += 1
    except BaseException as e:  # surfaced by the main loop
        state["error"] = e
    finally:
        state["chunks"] = seq
        for _ in range(num_workers):
            tasks.put(None)
        results.put((_READER_DONE, None))


class Progress:
    """spec §1.7 progress lines on stderr (`Processed N documents (x docs/s, y MB/s).`) every
    `interval` documents; on a terminal, one line updated in place with percent done and ETA."""

    def __init__(self, interval: int, total_bytes: int | None, stream=None):
        self.interval, self.total = max(1, interval), total_bytes
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()
        self.docs = self.nbytes = self.tokens = 0
        self._next, self._last_draw = self.interval, 0.0

    def update(self, docs: int, nbytes: int, tokens: int, position: int | None) -> None:
        self.docs += docs
        self.nbytes += nbytes
        self.tokens += tokens
        if self.tty:
            now = time.time()
            if now - self._last_draw > 0.2:
                self._last_draw = now
                print("\r" + self._line(position), end="", file=self.stream, flush=True)
        elif self.docs >= self._next:
            self._next = (self.docs // self.interval + 1) * self.interval
            print(self._line(None), file=self.stream, flush=True)

    def _line(self, position: int | None) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        line = (f"Processed {self.docs} documents ({self.docs / elapsed} docs/s, "
                f"{self.nbytes / elapsed / 1024 / 1024} MB/s).")
        if position is not None and self.total:
            frac = min(position / self.total, 1.0)
            eta = elapsed * (1 - frac) / frac if frac > 0 else 0
            line = f"[{frac * 100:5.1f}% eta {eta:5.0f}s] " + line
        return line

    def finish(self) -> None:
        if self.tty:
            print("\r" + self._line(None), file=self.stream, flush=True)


@dataclass
class EncodeStats:
    documents: int
    tokens: int
    nbytes: int
    seconds: float
    bad_lines: int
    outputs: list[str]


def _collect(results, procs, state, builders, progress) -> int:
    """Main loop: results in input order into the builders. Returns the bad-line count."""
    pending, next_seq, bad = {}, 0, 0
    while "chunks" not in state or next_seq < state["chunks"]:
        if "error" in state:
            raise state["error"]
        try:
            seq, result = results.get(timeout=1.0)
        except queue.Empty:
            _check_workers(procs, results, state, next_seq)
            continue
        if seq == _READER_DONE:
            continue
        if seq < 0:
            kind, payload = result
            if kind == "bad":
                raise BadLine(*payload)
            raise RuntimeError(payload)
        pending[seq] = result
        while next_seq in pending:
            chunk = pending.pop(next_seq)
            for key, batch in chunk.keys.items():
                builders[key].add_documents(batch.tokens, batch.lengths, batch.per_doc)
            for message in chunk.bad_lines:
                if bad < 20:
                    print(f"skipped {message}", file=sys.stderr)
            bad += len(chunk.bad_lines)
            progress.update(chunk.documents, chunk.nbytes, chunk.tokens, chunk.position)
            next_seq += 1
    if "error" in state:
        raise state["error"]
    return bad


def _check_workers(procs, results, state, next_seq: int) -> None:
    """After a wait without results: fail if a worker died. A worker that returned (exit code 0)
    is not dead: it received its stop marker after the reader's last chunk (at once for an empty
    input) and flushed its results into the queue before exiting."""
    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise RuntimeError(f"a preprocessing worker died (exit code {dead[0]}; out of memory?)")
    waiting = "chunks" in state and next_seq < state["chunks"]
    if waiting and all(p.exitcode == 0 for p in procs) and results.empty():
        raise RuntimeError(f"the preprocessing workers stopped without returning chunk {next_seq} of "
                           f"{state['chunks']}")


def encode_file(path: str, output_prefix: str, tok_cfg: TokenizerConfig, options: EncodeOptions,
                workers: int = 1, log_interval: int = 1000, level: str = "document",
                max_documents: int | None = None) -> EncodeStats:
    """Tokenize `path` into `{output_prefix}_{key}_{level}.bin/.idx` for every JSON key; only its
    first `max_documents` lines if given (the worker-count benchmark, --find-optimal-num-workers)."""
    start = time.time()
    tokenizer = build_tokenizer(tok_cfg)  # fails early, in this process, on bad tokenizer flags
    dtype = optimal_dtype(tokenizer.vocab_size)
    Encoder(tokenizer, options, dtype, path)  # option errors surface here, before any worker starts
    print(f"Opening {path}", file=sys.stderr, flush=True)
    prefixes = [f"{output_prefix}_{key}_{level}" for key in options.json_keys]
    builders = _open_builders(output_prefix, dict(zip(options.json_keys, prefixes)), dtype)
    ctx = mp.get_context()
    tasks, results = ctx.Queue(maxsize=4 * workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tok_cfg, options, dtype, path, tasks, results), daemon=True)
             for _ in range(max(1, workers))]
    for p in procs:
        p.start()
    state: dict = {}
    reader = threading.Thread(target=_read_chunks, args=(path, tasks, len(procs), state, results,
                                                         max_documents), daemon=True)
    reader.start()
    print(f"Time to startup: {time.time() - start}", file=sys.stderr, flush=True)
    progress = Progress(log_interval, _size_or_none(path))
    try:
        bad = _collect(results, procs, state, builders, progress)
        for b in builders.values():
            b.finalize()
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        # Chunks still buffered for dead or finished workers, and the reader's wake-up marker behind
        # unread results, must not block this process's exit.
        tasks.cancel_join_thread()
        results.cancel_join_thread()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
    progress.finish()
    if progress.docs == 0:
        print(f"warning: {path} holds no documents: the datasets written are empty", file=sys.stderr)
    return EncodeStats(progress.docs, progress.tokens, progress.nbytes, time.time() - start, bad, prefixes)


def _open_builders(output_prefix: str, prefixes: dict[str, str], dtype) -> dict[str, IndexedDatasetBuilder]:
    """One builder per JSON key; an unwritable --output-prefix is named in one line, and builders
    already opened drop their files."""
    builders: dict[str, IndexedDatasetBuilder] = {}
    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(prefix, dtype)
    except OSError as e:
        for b in builders.values():
            b.abort()
        raise DatasetWriteError(f"--output-prefix {output_prefix}: {e}") from None
    return builders


def _size_or_none(path: str) -> int | None:
    try:
        return file_size(path)
    except OSError:
        return None

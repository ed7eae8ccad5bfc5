"""Catalogue of bad preprocessing inputs (issue 15), through `tools/preprocess_data.py`'s main()
(and a few whole processes): every malformed JSONL line, damaged input file, unusable
tokenizer file and unwritable output ends in exactly one `error:` line naming the file (and line),
with no traceback from the tool or its worker processes and no output left behind; an empty input
gives an empty dataset every time."""
import gzip
import json
import queue
import subprocess
import sys
import threading
import time

import pytest

from megatron_lite.data import preprocess
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizers import TokenizerConfig
from tests.unit.data.test_preprocess import GPT2, ROOT, tool

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50"]
GOOD = '{"text": "1 2 3", "title": "4"}'


@pytest.fixture(scope="module")
def main():
    return tool("preprocess_data").main


def error_line(capfd, main, argv) -> str:
    """Run main(argv) expecting failure; the one `error:` line. capfd (not capsys) also sees what
    the forked worker processes write."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argument checks exit with their message, as the real CLI does
        rc = 1
        print(e.code, file=sys.stderr)
    out, err = capfd.readouterr()
    assert rc == 1 and "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def write_lines(path, lines) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


# (id, the bad second line, extra flags, what the message says after `file:2: `)
BAD_LINES = [
    ("array", "[1, 2]", [], "expected a JSON object, got an array"),
    ("string", '"just text"', [], "expected a JSON object, got a string"),
    ("number", "42", [], "expected a JSON object, got a number"),
    ("null", "null", [], "expected a JSON object, got null"),
    ("missing-key", '{"txt": "1"}', [], "missing key 'text' (--json-keys text)"),
    ("missing-second-key", '{"text": "1"}', ["--json-keys", "text", "title"], "missing key 'title'"),
    ("number-value", '{"text": 5}', [], "key 'text' holds a number, not a string"),
    ("null-value", '{"text": null}', [], "key 'text' holds null"),
    ("object-value", '{"text": {"a": "1"}}', [], "key 'text' holds an object"),
    ("bool-value", '{"text": true}', [], "key 'text' holds a boolean"),
    ("array-with-number", '{"text": ["1", 2]}', [], "key 'text' holds an array holding a number"),
    ("unterminated", '{"text": "1"', [], "malformed JSON"),
    ("trailing-garbage", '{"text": "1"} x', [], "malformed JSON (Extra data"),
    ("invalid-utf8", b'{"text": "1 \xff"}', [], "invalid UTF-8 at byte 12"),
    ("deep-nesting", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", [], "JSON nested too deeply"),
    ("huge-integer", '{"text": "1", "n": ' + "1" * 5000 + "}", [], "unusable JSON (Exceeds the limit"),
    ("words-for-null-tokenizer", '{"text": "one two"}', [], "cannot tokenize key 'text'"),
    ("id-equal-to-vocab", '{"text": "1 50"}', [],
     "key 'text' gives token id 50, outside the tokenizer's vocabulary [0, 50)"),
    ("id-past-uint16", '{"text": "70000"}', [], "key 'text' gives token id 70000, outside"),
    ("negative-id", '{"text": "3 -1"}', [], "key 'text' gives token id -1, outside"),
]


@pytest.mark.parametrize("line,flags,says", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_is_named_by_file_and_line(tmp_path, capfd, main, line, flags, says):
    src = write_lines(tmp_path / "in.jsonl", [GOOD, line, GOOD])
    message = error_line(capfd, main, ["--input", src, "--output-prefix", str(tmp_path / "out"), *NULL,
                                       "--workers", "1", *flags])
    assert message.startswith(f"error: {src}:2: {says}"), message
    assert message.endswith("(pass --skip-bad-lines to skip and count such lines)")
    assert not list(tmp_path.glob("out*"))  # nothing half-written is left


def _run_on(tmp_path, capfd, main, src, *flags) -> str:
    return error_line(capfd, main, ["--input", str(src), "--output-prefix", str(tmp_path / "out"), *NULL,
                                    "--workers", "2", *flags])


def _jsonl_bytes(n=5000) -> bytes:
    return b"".join(b'{"text": "%d %d"}\n' % (i % 40, i % 7) for i in range(n))


def test_truncated_gzip_names_the_file_and_last_line(tmp_path, capfd, main):
    src = tmp_path / "in.jsonl.gz"
    z = gzip.compress(_jsonl_bytes())
    src.write_bytes(z[:len(z) // 2])
    message = _run_on(tmp_path, capfd, main, src)
    assert message.startswith(f"error: {src}: truncated or corrupt compressed input after line ")
    assert "Compressed file ended before the end-of-stream marker" in message
    assert not list(tmp_path.glob("out*"))


def test_plain_text_named_gz_is_named(tmp_path, capfd, main):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(_jsonl_bytes(10))
    message = _run_on(tmp_path, capfd, main, src)
    assert message.startswith(f"error: {src}: truncated or corrupt compressed input before its first line "
                              "(Not a gzipped file")


def test_corrupt_zstd_is_named(tmp_path, capfd, main):
    zstandard = pytest.importorskip("zstandard")
    src = tmp_path / "in.jsonl.zst"
    z = zstandard.ZstdCompressor().compress(_jsonl_bytes())
    src.write_bytes(z[:len(z) // 2])
    message = _run_on(tmp_path, capfd, main, src)
    # zstandard's stream reader would have returned the partial output as a complete file.
    assert message.startswith(f"error: {src}: truncated or corrupt compressed input ")
    assert message.endswith("(the file ends inside a zstd frame)")


def test_truncated_gzip_inside_partitions_is_named(tmp_path, capfd, main):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(50)))
    z = gzip.compress(_jsonl_bytes())
    (parts / "b.jsonl.gz").write_bytes(z[:len(z) // 2])
    message = _run_on(tmp_path, capfd, main, parts / "*.jsonl.gz", "--partitions", "2")
    assert message.startswith(f"error: {parts / 'b.jsonl.gz'}: truncated or corrupt compressed input")
    assert not list(tmp_path.rglob("*.partial"))  # no half-dealt partition is left to be reused


def test_input_that_is_a_directory_is_named(tmp_path, capfd, main):
    message = _run_on(tmp_path, capfd, main, tmp_path)
    assert message == f"error: --input {tmp_path}: is a directory, expected a JSONL file"


def test_missing_input_is_named(tmp_path, capfd, main):
    assert _run_on(tmp_path, capfd, main, tmp_path / "nope.jsonl") == \
        f"error: --input {tmp_path / 'nope.jsonl'}: no such file"


def test_duplicate_json_key_is_refused(tmp_path, capfd, main):
    src = write_lines(tmp_path / "in.jsonl", [GOOD])
    message = _run_on(tmp_path, capfd, main, src, "--json-keys", "text", "text")
    assert message == "error: --json-keys: 'text' given twice (each key writes one dataset)"


def test_output_prefix_under_a_file_is_named(tmp_path, capfd, main):
    src = write_lines(tmp_path / "in.jsonl", [GOOD])
    (tmp_path / "afile").write_text("")
    message = error_line(capfd, main, ["--input", src, "--output-prefix", str(tmp_path / "afile" / "out"),
                                       *NULL, "--workers", "1"])
    assert message.startswith(f"error: --output-prefix {tmp_path / 'afile' / 'out'}: cannot create directory "
                              f"{tmp_path / 'afile'}")


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_output_directory_is_named(tmp_path, capfd, main):
    src = write_lines(tmp_path / "in.jsonl", [GOOD])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    message = error_line(capfd, main, ["--input", src, "--output-prefix", str(ro / "out"), *NULL,
                                       "--workers", "1"])
    assert message.startswith(f"error: --output-prefix {ro / 'out'}: cannot write {ro / 'out'}_text_document")


def test_unwritable_output_is_named_also_when_running_as_root(tmp_path, capfd, main, monkeypatch):
    # The read-only directory above, for the root user whom permissions do not stop.
    from megatron_lite.data import indexed_dataset

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(indexed_dataset, "open", refuse, raising=False)
    src = write_lines(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "ro" / "out"
    message = error_line(capfd, main, ["--input", src, "--output-prefix", str(out), *NULL, "--workers", "1"])
    assert message == (f"error: --output-prefix {out}: cannot write {out}_text_document.bin.partial "
                       "(Permission denied)")


def _gpt2(tmp_path, capfd, main, vocab=None, merges=None) -> str:
    src = write_lines(tmp_path / "in.jsonl", ['{"text": "hello world"}'])
    return error_line(capfd, main, ["--input", src, "--output-prefix", str(tmp_path / "out"),
                                    "--tokenizer-type", "GPT2BPETokenizer",
                                    "--vocab-file", str(vocab or GPT2 / "vocab.json"),
                                    "--merge-file", str(merges or GPT2 / "merges.txt"), "--workers", "1"])


# (id, merges.txt text, what the message says after `--merge-file PATH`)
BAD_MERGES = [
    ("empty", "", ": no merge rules (an empty or header-only merges.txt)"),
    ("header-only", "#version: 0.2\n", ": no merge rules"),
    ("blank-lines-only", "\n\n\n", ": no merge rules"),
    ("three-symbols", "#version: 0.2\nĠ t\na b c\n", ":3: expected two symbols, got 'a b c'"),
    ("one-symbol", "Ġ t\nabc\n", ":2: expected two symbols, got 'abc'"),
    ("not-byte-level", "Ġ t\n\x01 x\n", ":2: symbol '\\x01' is not byte-level BPE"),
]


@pytest.mark.parametrize("text,says", [c[1:] for c in BAD_MERGES], ids=[c[0] for c in BAD_MERGES])
def test_bad_merges_file_is_named(tmp_path, capfd, main, text, says):
    merges = tmp_path / "merges.txt"
    merges.write_text(text, encoding="utf-8")
    message = _gpt2(tmp_path, capfd, main, merges=merges)
    assert message.startswith(f"error: --merge-file {merges}{says}"), message


# (id, vocab.json text, what the message says after `--vocab-file PATH: `)
BAD_VOCABS = [
    ("empty-file", "", "not a GPT-2 vocab.json (Expecting value"),
    ("truncated-json", '{"a": 0, "b"', "not a GPT-2 vocab.json (Expecting ':' delimiter"),
    ("list", "[1, 2]", "not a GPT-2 vocab.json (expected a non-empty JSON object of token: id)"),
    ("empty-object", "{}", "not a GPT-2 vocab.json (expected a non-empty JSON object"),
    ("string-id", '{"a": "0"}', "entry 'a' has id 0, not an integer in [0, 1)"),
    ("float-id", '{"a": 0.5}', "entry 'a' has id 0.5, not an integer"),
    ("id-past-entries", '{"a": 0, "<|endoftext|>": 70000}', "entry '<|endoftext|>' has id 70000, not an "
                                                              "integer in [0, 2)"),
    ("negative-id", '{"a": -1}', "entry 'a' has id -1"),
    ("no-eod", '{"a": 0}', "no <|endoftext|> entry"),
    ("deep-nesting", "[" * 100_000, "not a GPT-2 vocab.json"),
]


@pytest.mark.parametrize("text,says", [c[1:] for c in BAD_VOCABS], ids=[c[0] for c in BAD_VOCABS])
def test_bad_vocab_file_is_named(tmp_path, capfd, main, text, says):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(text, encoding="utf-8")
    message = _gpt2(tmp_path, capfd, main, vocab=vocab)
    assert message.startswith(f"error: --vocab-file {vocab}: {says}"), message


def test_vocab_and_merges_that_do_not_belong_together_are_named(tmp_path, capfd, main):
    vocab = tmp_path / "vocab.json"
    full = json.loads((GPT2 / "vocab.json").read_text(encoding="utf-8"))
    kept = {t: i for t, i in full.items() if i < 300}
    kept["<|endoftext|>"] = 300
    vocab.write_text(json.dumps(kept), encoding="utf-8")
    message = _gpt2(tmp_path, capfd, main, vocab=vocab)
    assert f"which --vocab-file {vocab} lacks: the two files do not belong together" in message


def test_empty_tiktoken_file_is_named(tmp_path, capfd, main):
    model = tmp_path / "empty.tiktoken"
    model.write_text("")
    src = write_lines(tmp_path / "in.jsonl", [GOOD])
    message = error_line(capfd, main, ["--input", src, "--output-prefix", str(tmp_path / "out"),
                                       "--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(model),
                                       "--tiktoken-pattern", "v2", "--workers", "1"])
    assert message == f"error: --tokenizer-model {model}: not a tiktoken vocabulary (no ranks: an empty file)"


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_input_gives_an_empty_dataset_every_time(tmp_path, capfd, main, content):
    # Regression: the main loop took workers that had already returned for dead ones (~3 in 25 runs).
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    for run in range(6):
        out = str(tmp_path / f"out{run}")
        assert main(["--input", str(src), "--output-prefix", out, *NULL, "--workers", "2"]) == 0
        err = capfd.readouterr().err
        assert "error" not in err and f"warning: {src} holds no documents" in err
        ds = IndexedDataset(f"{out}_text_document")
        assert len(ds) == 0 and ds.document_indices.tolist() == [0]


class _Returned:
    exitcode = 0  # a worker that received its stop marker and returned


class _Killed:
    exitcode = -9  # e.g. the kernel's out-of-memory killer


def _collect_after_late_reader(procs, state):
    """_collect with the reader finishing (no chunks) 1.5 s after every worker has returned."""
    results = queue.Queue()

    def reader():
        time.sleep(1.5)
        state["chunks"] = 0
        results.put((preprocess._READER_DONE, None))

    threading.Thread(target=reader, daemon=True).start()
    progress = preprocess.Progress(1000, None)
    return preprocess._collect(results, procs, state, {}, progress)


def test_returned_workers_are_not_taken_for_dead_ones():
    assert _collect_after_late_reader([_Returned(), _Returned()], {}) == 0


def test_a_killed_worker_is_reported_with_its_exit_code():
    expected = r"^a preprocessing worker died \(exit code -9; out of memory\?\)$"
    with pytest.raises(RuntimeError, match=expected):
        _collect_after_late_reader([_Returned(), _Killed()], {})


def test_worker_crash_is_one_line_naming_the_chunk(tmp_path, monkeypatch):
    def boom(self, first, lines):
        raise KeyError("surprise")

    monkeypatch.setattr(preprocess.Encoder, "encode_chunk", boom)
    tasks, results = queue.Queue(), queue.Queue()
    tasks.put((0, 11, [b"{}", b"{}", b"{}"], None))
    preprocess._worker(TokenizerConfig("NullTokenizer", vocab_size=10), preprocess.EncodeOptions(),
                       None, "in.jsonl", tasks, results)
    seq, (kind, message) = results.get_nowait()
    assert (seq, kind) == (preprocess._WORKER_FAILED, "crash")
    assert message == "in.jsonl:11-13: preprocessing worker failed on these lines (KeyError: 'surprise')"


@pytest.mark.parametrize("case", ["truncated-gzip", "deep-nesting", "empty-merges"])
def test_whole_process_prints_one_line_and_no_traceback(tmp_path, case):
    src = tmp_path / "in.jsonl"
    flags = NULL
    if case == "truncated-gzip":
        src = tmp_path / "in.jsonl.gz"
        z = gzip.compress(_jsonl_bytes())
        src.write_bytes(z[:len(z) // 2])
    elif case == "deep-nesting":
        write_lines(src, [GOOD, '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    else:
        write_lines(src, [GOOD])
        (tmp_path / "merges.txt").write_text("")
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2 / "vocab.json"),
                 "--merge-file", str(tmp_path / "merges.txt")]
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
                          "--output-prefix", str(tmp_path / "out"), *flags, "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and (str(src) in errors[0] or "merges.txt" in errors[0]), run.stderr
    assert run.stderr.rstrip().endswith(errors[0])  # the error is the last word

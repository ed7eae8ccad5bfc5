"""tools/preprocess_data.py, merge_datasets.py and inspect_dataset.py: output bytes exactly as
spec §1.3/§1.7 for hand-computed documents, bad-line reporting, interrupted runs."""
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import preprocess
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizers import TokenizerConfig, build_tokenizer
from tests.unit.data.test_indexed_dataset import bin_bytes, idx_bytes

ROOT = Path(__file__).resolve().parents[3]
GPT2 = ROOT / "tests" / "data" / "gpt2"
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2 / "vocab.json"),
              "--merge-file", str(GPT2 / "merges.txt")]


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def preprocess_data():
    return tool("preprocess_data")


def write_jsonl(path: Path, docs, raw_lines=()) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def read(prefix) -> tuple[bytes, bytes]:
    return open(f"{prefix}.idx", "rb").read(), open(f"{prefix}.bin", "rb").read()


NULL_DOCS = [{"text": "5 6 7"}, {"text": ""}, {"text": "8"}, {"text": "9 10", "other": "x"}]


@pytest.mark.parametrize("vocab,code,fmt", [(1000, 8, "H"), (70000, 4, "i")], ids=["uint16", "int32"])
def test_document_level_bytes(tmp_path, preprocess_data, vocab, code, fmt):
    src = write_jsonl(tmp_path / "in.jsonl", NULL_DOCS)
    assert preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                                 "NullTokenizer", "--vocab-size", str(vocab), "--append-eod",
                                 "--workers", "2"]) == 0
    eod = vocab - 1
    # The empty document is recorded without sequences and gets no EOD (spec §1.7).
    want_idx = idx_bytes(code, 4 if fmt == "i" else 2, [4, 2, 3], [0, 1, 1, 2, 3])
    want_bin = bin_bytes(fmt, [5, 6, 7, eod, 8, eod, 9, 10, eod])
    assert read(tmp_path / "out_text_document") == (want_idx, want_bin)
    assert IndexedDataset(str(tmp_path / "out_text_document"))[2].tolist() == [9, 10, eod]


def test_sentence_level_bytes_from_pre_split_lists(tmp_path, preprocess_data):
    docs = [{"text": ["1 2", "", "3 4 5"]}, {"text": ["6"]}, {"text": []}]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    assert preprocess_data.main(["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                                 "NullTokenizer", "--vocab-size", "100", "--append-eod", "--split-sentences",
                                 "--workers", "1"]) == 0
    # Empty sentences are dropped; EOD extends the last sentence.
    want = (idx_bytes(8, 2, [2, 4, 2], [0, 2, 3, 3]), bin_bytes("H", [1, 2, 3, 4, 5, 99, 6, 99]))
    assert read(tmp_path / "o_text_sentence") == want


def test_split_sentences_with_punkt_and_gpt2(tmp_path, preprocess_data):
    texts = ["The cat sat on the mat. The dog ran away! Did it come back? Yes, it did.",
             "Mr. Smith went to Washington. He liked it."]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "g"
    assert preprocess_data.main(["--input", src, "--output-prefix", str(out), *GPT2_FLAGS,
                                 "--split-sentences", "--append-eod", "--workers", "1"]) == 0
    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(GPT2 / "vocab.json"),
                                          str(GPT2 / "merges.txt")))
    sentences = [["The cat sat on the mat.", "The dog ran away!", "Did it come back?", "Yes, it did."],
                 ["Mr. Smith went to Washington.", "He liked it."]]
    ids = [tok.tokenize(s) for doc in sentences for s in doc]
    ids[3].append(tok.eod)
    ids[5].append(tok.eod)
    want = (idx_bytes(8, 2, [len(x) for x in ids], [0, 4, 6]), bin_bytes("H", [t for x in ids for t in x]))
    assert read(f"{out}_text_sentence") == want


def test_compressed_inputs_and_partitions_give_the_same_bytes(tmp_path, preprocess_data):
    docs = [{"text": " ".join(str(i + j) for j in range(i % 5 + 1))} for i in range(40)]
    plain = write_jsonl(tmp_path / "in.jsonl", docs)
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "500", "--append-eod"]
    assert preprocess_data.main(["--input", plain, "--output-prefix", str(tmp_path / "p"), *flags,
                                 "--workers", "1"]) == 0
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(Path(plain).read_bytes()))
    assert preprocess_data.main(["--input", str(gz), "--output-prefix", str(tmp_path / "z"), *flags,
                                 "--workers", "2"]) == 0
    assert read(tmp_path / "z_text_document") == read(tmp_path / "p_text_document")
    zstandard = pytest.importorskip("zstandard")
    zst = tmp_path / "in.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(Path(plain).read_bytes()))
    assert preprocess_data.main(["--input", str(zst), "--output-prefix", str(tmp_path / "s"), *flags,
                                 "--workers", "1"]) == 0
    assert read(tmp_path / "s_text_document") == read(tmp_path / "p_text_document")
    # Two partitions: lines dealt round-robin, merged in partition order (spec §1.7).
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "a.jsonl", docs[:25])
    write_jsonl(parts / "b.jsonl", docs[25:])
    assert preprocess_data.main(["--input", str(parts / "*.jsonl"), "--output-prefix", str(tmp_path / "m"),
                                 *flags, "--workers", "2", "--partitions", "2"]) == 0
    merged = IndexedDataset(str(tmp_path / "m_text_document"))
    single = IndexedDataset(str(tmp_path / "p_text_document"))
    order = list(range(0, 40, 2)) + list(range(1, 40, 2))
    assert [s.tolist() for s in merged[0:40]] == [single[i].tolist() for i in order]


def test_bad_lines_are_reported_with_file_and_line(tmp_path, preprocess_data, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"text": "1 2"}],
                raw_lines=['{"text": "3"', json.dumps({"txt": "4"}), "", '"just a string"'])
    with open(src, "ab") as f:
        f.write(b'{"text": "5 \xff"}\n')
        f.write(b'{"text": "6"}\n')
    flags = ["--input", str(src), "--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--workers", "1"]
    assert preprocess_data.main([*flags, "--output-prefix", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"{src}:2: malformed JSON" in err and "--skip-bad-lines" in err
    assert not list(tmp_path.glob("x_*"))  # nothing written, not even a partial .bin
    assert preprocess_data.main([*flags, "--output-prefix", str(tmp_path / "y"), "--skip-bad-lines"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:3: missing key 'text'" in err
    assert f"{src}:5: expected a JSON object" in err
    assert f"{src}:6: invalid UTF-8" in err
    assert "Skipped 4 bad lines" in err  # the blank line 4 is not a document and not an error
    assert [s.tolist() for s in IndexedDataset(str(tmp_path / "y_text_document"))[0:2]] == [[1, 2], [6]]


def test_interrupted_run_leaves_no_index(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": str(i % 7)} for i in range(2000)])
    out = tmp_path / "o"
    # A complete dataset from an earlier run must not survive next to new, partial tokens.
    write = preprocess.IndexedDatasetBuilder(f"{out}_text_document", np.uint16)
    write.add_document([1], [1])
    write.finalize()
    calls = []

    def interrupt(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    original = preprocess.IndexedDatasetBuilder.add_documents
    monkeypatch.setattr(preprocess.IndexedDatasetBuilder, "add_documents", interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess.encode_file(src, str(out), TokenizerConfig("NullTokenizer", vocab_size=10),
                               preprocess.EncodeOptions(), workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_progress_lines_follow_megatrons_template(capsys):
    import io
    import re

    stream = io.StringIO()
    p = preprocess.Progress(interval=10, total_bytes=None, stream=stream)
    p.update(12, 2048, 30, None)
    p.update(3, 10, 5, None)
    p.update(7, 10, 5, None)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert re.fullmatch(r"Processed \d+ documents \([\d.e+-]+ docs/s, [\d.e+-]+ MB/s\)\.", line), line


def test_merge_and_inspect_tools(tmp_path, capsys):
    d = tmp_path / "parts"
    d.mkdir()
    for name, toks, code, fmt in (("b", [3, 4], 4, "i"), ("a", [1, 2], 4, "i")):
        (d / f"{name}.idx").write_bytes(idx_bytes(code, 4, [len(toks)], [0, 1]))
        (d / f"{name}.bin").write_bytes(bin_bytes(fmt, toks))
    merge = tool("merge_datasets")
    assert merge.main(["--input", str(d), "--output-prefix", str(tmp_path / "all")]) == 0
    assert read(tmp_path / "all") == (idx_bytes(4, 4, [2, 2], [0, 1, 2]), bin_bytes("i", [1, 2, 3, 4]))
    (d / "c.idx").write_bytes(idx_bytes(4, 4, [1], [0, 1]))
    assert merge.main(["--input", str(d), "--output-prefix", str(tmp_path / "all2")]) == 1
    assert "c.bin is missing" in capsys.readouterr().err
    inspect = tool("inspect_dataset")
    assert inspect.main(["--data-path", str(tmp_path / "all"), "--tokenizer-type", "NullTokenizer",
                         "--vocab-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "documents: 2" in out and "tokens:    4" in out and "dtype:     int32" in out and "'1 2'" in out


def test_keep_newlines_keeps_the_whitespace_after_each_sentence():
    from megatron_lite.data.sentence_split import SentenceSplitter, train_punkt_parameters

    text = "The first one is here.\nThe second one is there. The third."
    params = train_punkt_parameters([text])
    assert SentenceSplitter(params).split(text) == [
        "The first one is here.", "The second one is there.", "The third."]
    assert SentenceSplitter(params, keep_newlines=True).split(text) == [
        "The first one is here.\n", "The second one is there. ", "The third."]

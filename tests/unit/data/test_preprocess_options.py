"""Megatron-LM's preprocess_data.py options (spec §1.7): --tokenizer-type not required by the
parser, the worker-count benchmark, the Hugging Face special-token switch, and the one-line
refusal of the tokenizer flags that cannot change the tokens written."""
import os

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizers import TokenizerConfig, build_tokenizer
from tests.unit.data.test_preprocess import GPT2_FLAGS, tool, write_jsonl

SUPPORTED = ("GPT2BPETokenizer, SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, "
             "TikTokenizer, HuggingFaceTokenizer, NullTokenizer")


@pytest.fixture(scope="module")
def preprocess_data():
    return tool("preprocess_data")


@pytest.fixture
def corpus(tmp_path):
    docs = [{"text": f"document number {i} says hello"} for i in range(12)]
    return write_jsonl(tmp_path / "in.jsonl", docs)


def _error(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_tokenizer_type_is_not_required_by_the_parser(preprocess_data, corpus, tmp_path, capsys):
    argv = ["--input", corpus, "--output-prefix", str(tmp_path / "o"), "--workers", "1"]
    assert preprocess_data.build_parser().parse_args(argv).tokenizer_type is None
    assert preprocess_data.main(argv) == 1
    assert _error(capsys) == [f"error: --tokenizer-type is needed to tokenize text (one of: {SUPPORTED})"]


NA = "does not apply to tokenizing data"
REFUSED = [
    (["--padded-vocab-size", "50304"], f"--padded-vocab-size {NA} (it sizes the "
     "model's embedding table: pass it to training)"),
    (["--no-pad-vocab-size"], f"--no-pad-vocab-size {NA} (it concerns the model's "
     "embedding table)"),
    (["--vocab-extra-ids", "100"], f"--vocab-extra-ids {NA} (Megatron-LM's "
     "preprocess_data.py fixes it at 0)"),
    (["--null-tokenizer-pad-id", "3"], f"--null-tokenizer-pad-id {NA} (pad ids are "
     "never written)"),
    (["--chat-template", "{{x}}"], f"--chat-template {NA} (it formats "
     "conversations, not plain text)"),
    (["--tokenizer-metadata", "m.json"], "--tokenizer-metadata is not supported by megatron_lite (its "
     "tokenizer comes from --tokenizer-type)"),
    (["--tokenizer-sentencepiece-legacy"],
     "--tokenizer-sentencepiece-legacy is not supported by megatron_lite"),
    (["--no-tokenizer-sentencepiece-ignore-extra-whitespaces"],
     "--no-tokenizer-sentencepiece-ignore-extra-whitespaces is not supported by megatron_lite"),
    (["--use-gigatoken"], "--use-gigatoken is not supported by megatron_lite"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[r[0][0] for r in REFUSED])
def test_refused_in_one_line(preprocess_data, corpus, tmp_path, capsys, flags, message):
    out = str(tmp_path / "o")
    argv = ["--input", corpus, "--output-prefix", out, "--workers", "1", *GPT2_FLAGS, *flags]
    assert preprocess_data.main(argv) == 1
    assert _error(capsys) == [f"error: {message}"]
    assert not os.path.exists(out + "_text_document.idx")


@pytest.mark.parametrize("flags", [["--max-documents", "10"], ["--workers-to-check", "1", "2"]])
def test_benchmark_flags_need_the_benchmark(preprocess_data, corpus, tmp_path, flags):
    """Megatron-LM reads them only with --find-optimal-num-workers; alone they would be ignored."""
    argv = ["--input", corpus, "--output-prefix", str(tmp_path / "o"), "--workers", "1", *GPT2_FLAGS, *flags]
    with pytest.raises(SystemExit, match=f"^error: {flags[0]} needs --find-optimal-num-workers$"):
        preprocess_data.main(argv)


def test_find_optimal_num_workers_ranks_counts_and_writes_nothing(preprocess_data, corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    argv = ["--input", corpus, "--output-prefix", out, "--workers", "1", *GPT2_FLAGS,
            "--find-optimal-num-workers", "--workers-to-check", "1", "2", "--max-documents", "5"]
    assert preprocess_data.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Processing data with 1 workers." in lines and "Processing data with 2 workers." in lines
    ranking = lines[lines.index("Performance results (fastest → slowest):") + 1:][:2]
    assert sorted(line.split(".")[0] for line in ranking) == ["1", "2"]
    assert all(" workers → avg. docs/s: " in line for line in ranking)
    best = ranking[0].split(". ", 1)[1].split(" workers")[0]
    assert any(line.startswith(f"The most optimal num of workers is {best} with avg. preprocessed docs/s: ")
               for line in lines)
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no dataset, no temporary directory left here


def test_find_optimal_drops_counts_the_partitions_do_not_divide(preprocess_data, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}] * 4)
    argv = ["--input", src, "--output-prefix", str(tmp_path / "o"), "--workers", "2", *GPT2_FLAGS,
            "--partitions", "2", "--find-optimal-num-workers", "--workers-to-check", "3", "2",
            "--max-documents", "2"]
    assert preprocess_data.main(argv) == 0
    out = capsys.readouterr().out
    assert ("Removing num_workers (3) from workers list because it's not divisible by num_partitions (2)"
            in out)
    assert "The most optimal num of workers is 2 with avg. preprocessed docs/s: " in out


def test_max_documents_limits_the_encoded_documents(tmp_path):
    from megatron_lite.data.preprocess import EncodeOptions, encode_file

    docs = write_jsonl(tmp_path / "ids.jsonl", [{"text": " ".join(map(str, range(n + 1)))}
                                                for n in range(10)])
    cfg = TokenizerConfig("NullTokenizer", vocab_size=64)
    stats = encode_file(docs, str(tmp_path / "d"), cfg, EncodeOptions(), workers=1, max_documents=4)
    assert stats.documents == 4
    written = IndexedDataset(str(tmp_path / "d_text_document"))
    assert len(written.document_indices) == 5 and list(written[3]) == [0, 1, 2, 3]


def _hf_with_bos(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world hello tokenizers"] * 10,
                            trainers.BpeTrainer(vocab_size=50, special_tokens=["<unk>", "<s>", "</s>"]))
    # A Llama-style post-processor: every encoding starts with <s>.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path), tok.token_to_id("<s>")


def test_hf_special_tokens_included_unless_asked(tmp_path, preprocess_data):
    path, bos = _hf_with_bos(tmp_path)
    with_bos = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=path))
    without = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=path,
                                              hf_include_special_tokens=False))
    assert with_bos.tokenize("hello world")[0] == bos and bos not in without.tokenize("hello world")
    assert with_bos.tokenize("hello world")[1:] == without.tokenize("hello world")
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello world"}])
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", path, "--workers", "1",
          "--input", src]
    assert preprocess_data.main([*hf, "--output-prefix", str(tmp_path / "a")]) == 0
    assert preprocess_data.main([*hf, "--output-prefix", str(tmp_path / "b"),
                                 "--tokenizer-hf-no-include-special-tokens"]) == 0
    a = np.asarray(IndexedDataset(str(tmp_path / "a_text_document"))[0])
    b = np.asarray(IndexedDataset(str(tmp_path / "b_text_document"))[0])
    assert a[0] == bos and list(a[1:]) == list(b)


def test_hf_no_use_fast_needs_a_transformers_directory(tmp_path):
    from megatron_lite.data.tokenizers import TokenizerError

    path, _ = _hf_with_bos(tmp_path)
    with pytest.raises(TokenizerError, match="^--tokenizer-hf-no-use-fast needs `transformers` and a "
                                             "tokenizer directory as --tokenizer-model"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=path, hf_use_fast=False))

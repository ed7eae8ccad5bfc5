"""Tokenizers built from local files: GPT-2 BPE against tiktoken's own GPT-2 encoding, the
SentencePiece family, TikTokenizer, HuggingFaceTokenizer, NullTokenizer, and the error messages
for missing or unreadable files."""
import base64
import json
import os
from pathlib import Path

import pytest

from megatron_lite.data.tokenizers import TokenizerConfig, TokenizerError, build_tokenizer

GPT2 = Path(__file__).resolve().parents[2] / "data" / "gpt2"  # tests/data/gpt2

SAMPLE = [
    "Hello, world! It's a test: don't we'll they've I'm you'd she's.",
    "naïve café résumé — Ünïcödé Ωμέγα 日本語のテキスト 한국어 العربية 🤖🚀👍🏽 e\u0301",
    "    leading spaces\tand\ttabs\n\n\nnewlines   \r\n trailing spaces     ",
    "supercalifragilisticexpialidocious" * 5 + " pneumonoultramicroscopicsilicovolcanoconiosis",
    "def f(x):\n    return x**2 + 3.14159e-10  # comment\n\tif a != b: pass",
    "Numbers 1234567890 12,345.67 and symbols @#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "<|endoftext|> is just text here, as are <s> and </s>",
    "",
    " ",
    "a" * 3000,
]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_from(GPT2 / "vocab.json", GPT2 / "merges.txt")


def gpt2_from(vocab, merges):
    return build_tokenizer(TokenizerConfig("GPT2BPETokenizer", str(vocab), str(merges)))


def test_gpt2_matches_tiktokens_gpt2_encoding_built_from_the_same_files(gpt2):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2 / "merges.txt"), str(GPT2 / "vocab.json"))
    ref = tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    # The original GPT-2 regex too: the possessive pattern must split identically.
    original = tiktoken.Encoding(
        "gpt2-original", mergeable_ranks=ranks, special_tokens={},
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    for text in SAMPLE:
        ids = gpt2.tokenize(text)
        assert ids == ref.encode_ordinary(text) == original.encode_ordinary(text), text[:40]
        assert gpt2.detokenize(ids) == text
    assert gpt2.vocab_size == 50257 and gpt2.eod == 50256
    assert gpt2.tokenize("Hello world") == [15496, 995]


def test_gpt2_with_ids_out_of_merge_order(tmp_path):
    """A vocab.json whose ids do not follow merge order still maps to its own ids."""
    vocab = json.loads((GPT2 / "vocab.json").read_text(encoding="utf-8"))
    merges = (GPT2 / "merges.txt").read_text(encoding="utf-8").split("\n")[:2001]
    keep = {t: i for t, i in vocab.items() if i < 256 + 2000}
    shuffled = {t: (len(keep) - 1 - i) for t, i in keep.items()}
    shuffled["<|endoftext|>"] = len(shuffled)
    (tmp_path / "v.json").write_text(json.dumps(shuffled), encoding="utf-8")
    (tmp_path / "m.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    in_order = dict(keep, **{"<|endoftext|>": len(keep)})
    (tmp_path / "o.json").write_text(json.dumps(in_order), encoding="utf-8")
    small = gpt2_from(tmp_path / "v.json", tmp_path / "m.txt")
    plain = gpt2_from(tmp_path / "o.json", tmp_path / "m.txt")
    text = "the quick brown fox"
    ids = small.tokenize(text)
    assert small.detokenize(ids) == text
    by_id = {v: k for k, v in shuffled.items()}
    by_id_plain = {v: k for k, v in in_order.items()}
    assert [by_id[i] for i in ids] == [by_id_plain[i] for i in plain.tokenize(text)]


@pytest.mark.parametrize("flag,bad", [("--vocab-file", "missing"), ("--merge-file", "missing"),
                                      ("--vocab-file", "dir"), ("--vocab-file", "garbage")])
def test_missing_or_unreadable_files_name_flag_and_path(tmp_path, flag, bad):
    paths = {"--vocab-file": str(GPT2 / "vocab.json"), "--merge-file": str(GPT2 / "merges.txt")}
    if bad == "missing":
        paths[flag] = str(tmp_path / "nope.json")
    elif bad == "dir":
        paths[flag] = str(tmp_path)
    else:
        (tmp_path / "garbage.json").write_text("{not json")
        paths[flag] = str(tmp_path / "garbage.json")
    with pytest.raises(TokenizerError) as info:
        build_tokenizer(TokenizerConfig("GPT2BPETokenizer", paths["--vocab-file"], paths["--merge-file"]))
    assert flag in str(info.value) and paths[flag] in str(info.value)


def test_missing_flag_is_named():
    with pytest.raises(TokenizerError, match="needs --tokenizer-model"):
        build_tokenizer(TokenizerConfig("Llama2Tokenizer"))
    with pytest.raises(TokenizerError, match="--tokenizer-model /no/such.model: no such file"):
        build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model="/no/such.model"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    text = d / "corpus.txt"
    words = "the quick brown fox jumps over the lazy dog while data flows into tokenizers".split()
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "m"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    return str(d / "m.model")


def test_sentencepiece_family(sp_model):
    gpt = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model=sp_model))
    llama = build_tokenizer(TokenizerConfig("Llama2Tokenizer", tokenizer_model=sp_model))
    generic = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", tokenizer_model=sp_model))
    text = "the lazy fox"
    ids = gpt.tokenize(text)
    assert gpt.detokenize(ids) == text and gpt.vocab_size == 60
    assert gpt.eod == 2 and gpt.bos == 1 and gpt.pad is None  # SentencePiece defaults: eos 2, bos 1
    assert llama.tokenize(text) == [1, *ids] and llama.eod == 2
    # Megatron's generic wrapper appends <CLS> <SEP> <EOD> <MASK> <PAD> after the 60 pieces.
    assert generic.vocab_size == 65 and generic.eod == 62 and generic.pad == 64 and generic.bos == 1
    assert generic.tokenize("the<EOD>fox") == [*gpt.tokenize("the"), 62, *gpt.tokenize("fox")]
    assert "<EOD>" in generic.detokenize(generic.tokenize("the<EOD>fox"))


def test_tiktokenizer_json_and_tiktoken_formats(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the"]
    entries = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("latin-1")}
               for i, t in enumerate(ranks)]
    (tmp_path / "v.json").write_text(json.dumps(entries))
    (tmp_path / "v.tiktoken").write_text("\n".join(f"{base64.b64encode(t).decode()} {i}"
                                                    for i, t in enumerate(ranks)))
    for name in ("v.json", "v.tiktoken"):
        tok = build_tokenizer(TokenizerConfig("TikTokenizer", tokenizer_model=str(tmp_path / name),
                                              tiktoken_pattern="v2", vocab_size=300,
                                              tiktoken_num_special_tokens=10))
        ids = tok.tokenize("the the")
        assert ids == [10 + 257, 10 + 258] and tok.detokenize(ids) == "the the"
        assert (tok.vocab_size, tok.bos, tok.eod) == (300, 1, 2)
    with pytest.raises(TokenizerError, match="--tiktoken-pattern"):
        build_tokenizer(TokenizerConfig("TikTokenizer", tokenizer_model=str(tmp_path / "v.json")))


def test_huggingface_tokenizer_from_a_local_directory(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world hello tokenizers"] * 10,
                            trainers.BpeTrainer(vocab_size=50,
                                                special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    os.makedirs(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    paths = [str(tmp_path / "hf" / "tokenizer.json")]
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path / "saved"))
    paths.append(str(tmp_path / "saved"))
    for path in paths:
        hf = build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=path))
        assert hf.detokenize(hf.tokenize("hello world")).replace(" ", "") == "helloworld"
        assert hf.eod == tok.token_to_id("</s>") and hf.pad == tok.token_to_id("<pad>")
        assert hf.vocab_size == tok.get_vocab_size()
    with pytest.raises(TokenizerError, match="downloads"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", tokenizer_model="gpt2"))


def test_null_tokenizer():
    tok = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=256))
    assert (tok.vocab_size, tok.eod, tok.pad) == (256, 255, None)
    assert tok.tokenize("1 2  3\n4") == [1, 2, 3, 4] and tok.detokenize([5, 6]) == "5 6"
    assert build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=256, null_tokenizer_eod_id=0)).eod == 0
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer(TokenizerConfig("NullTokenizer"))
    with pytest.raises(TokenizerError, match="not available"):
        build_tokenizer(TokenizerConfig("BertWordPieceCase"))

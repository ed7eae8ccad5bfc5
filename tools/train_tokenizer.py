"""Train a SentencePiece model on a loose-JSON corpus (one JSON object per line), offline.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix out/spm --vocab-size 4096
    # -> out/spm.model, used with --tokenizer-type Llama2Tokenizer --tokenizer-model out/spm.model

Whitespace is kept as is (code and indentation survive the round trip) and unknown characters
fall back to bytes, so `detokenize(tokenize(text)) == text`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def write_lines(jsonl: str, key: str, out) -> int:
    """The non-blank lines of every document's `key`, one per line (SentencePiece's input)."""
    n = 0
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            for text_line in json.loads(line)[key].splitlines():
                if text_line.strip():
                    out.write(text_line + "\n")
                    n += 1
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL corpus.")
    parser.add_argument("--json-key", default="text", help="Key holding the text.")
    parser.add_argument("--model-prefix", required=True, help="Writes PREFIX.model and PREFIX.vocab.")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--max-lines", type=int, default=200_000,
                        help="Lines of text to train on, sampled at random from the whole corpus.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    import sentencepiece as spm

    Path(args.model_prefix).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as tmp:
        lines = write_lines(args.input, args.json_key, tmp)
    try:
        spm.SentencePieceTrainer.train(
            input=tmp.name, model_prefix=args.model_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True, num_threads=args.threads,
            input_sentence_size=args.max_lines, shuffle_input_sentence=True,
            max_sentence_length=16384, minloglevel=2)
    finally:
        os.remove(tmp.name)
    print(f"Trained {args.model_prefix}.model ({args.vocab_size} pieces) on up to {args.max_lines} of "
          f"{lines} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

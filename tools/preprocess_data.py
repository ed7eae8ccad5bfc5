"""Turn loose JSON (one object per line; .gz/.zst welcome) into Megatron `.bin`/`.idx` datasets,
with Megatron's flags (spec §1.7):

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 8
    # -> data/corpus_text_document.bin / .idx, trained with --data-path data/corpus_text_document

With `--partitions N` (N > 1), `--input` is a glob; its lines are dealt round-robin (or in
contiguous blocks with --keep-sequential-samples) into `<input-stem>_<i><ext>` files, encoded in
N processes of workers/N workers each, and merged in partition order.

`--find-optimal-num-workers` encodes the first `--max-documents` documents with each worker count
of `--workers-to-check` and prints the fastest (spec §1.7); it writes no dataset.
"""
from __future__ import annotations

import argparse
import glob
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lite.config.tool_args import add_tokenizer_args, tokenizer_config_from_tool_args  # noqa: E402
from megatron_lite.data.indexed_dataset import (  # noqa: E402
    Index,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)
from megatron_lite.data.preprocess import EncodeOptions, EncodeStats, encode_file  # noqa: E402
from megatron_lite.data.sentence_split import punkt_parameters  # noqa: E402
from megatron_lite.data.text_input import (  # noqa: E402
    BadLine,
    decode_document,
    iter_lines,
    numbered_lines,
    open_binary,
)
from megatron_lite.data.tokenizers import TokenizerError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file (a glob with --partitions > 1).")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="Keys to extract, one dataset each.")
    g.add_argument("--split-sentences", action="store_true", help="One sequence per sentence (nltk punkt).")
    g.add_argument("--keep-newlines", action="store_true", help="Keep newlines between sentences.")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="Skip and count malformed lines instead of stopping at the first one.")
    add_tokenizer_args(p)
    g = p.add_argument_group("tokenization")
    g.add_argument("--append-eod", action="store_true", help="Append the end-of-document token.")
    g.add_argument("--lang", default="english", help="Punkt language for --split-sentences.")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="Writes PREFIX_{key}_{document|sentence}.bin/.idx.")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, required=True, help="Worker processes (in total).")
    g.add_argument("--partitions", type=int, default=1, help="Input partitions, encoded in parallel.")
    g.add_argument("--log-interval", type=int, default=1000, help="Documents between progress lines.")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="Partition into contiguous blocks instead of round-robin.")
    g.add_argument("--find-optimal-num-workers", action="store_true",
                   help="Encode the first --max-documents documents with each count of --workers-to-check "
                   "(temporary outputs, removed) and print the fastest; no dataset is written.")
    g.add_argument("--workers-to-check", nargs="+", type=int, default=list(_WORKERS_TO_CHECK),
                   help="Worker counts tried by --find-optimal-num-workers.")
    g.add_argument("--max-documents", type=int, default=_MAX_DOCUMENTS,
                   help="Documents encoded per try of --find-optimal-num-workers.")
    return p


# Megatron-LM's defaults of --workers-to-check and --max-documents (spec §1.7).
_WORKERS_TO_CHECK = (16, 32, 64)
_MAX_DOCUMENTS = 100_000


def _partition_name(pattern: str, i: int) -> str:
    stem, ext = os.path.splitext(pattern)
    return f"{stem}_{i}{ext}"


def make_partitions(pattern: str, n: int, sequential: bool) -> list[str]:
    """Deal the lines of every file matching `pattern` into n partition files (reused if present)."""
    names = [_partition_name(pattern, i) for i in range(n)]
    if all(os.path.isfile(f) for f in names):
        print(f"Reusing partition files {names[0]} ... {names[-1]}", file=sys.stderr)
        return names
    inputs = sorted(f for f in glob.glob(pattern) if f not in names)
    if not inputs:
        raise FileNotFoundError(f"--input {pattern}: no file matches")
    block = None
    if sequential:
        total = sum(1 for f in inputs for _ in iter_lines(f))
        block = max(1, math.ceil(total / n))
    outs = []
    try:
        for name in names:
            outs.append(open(name + ".partial", "wb"))
        k = 0
        for f in inputs:
            with open_binary(f) as fin:
                for _, line in numbered_lines(fin, f):
                    part = min(k // block, n - 1) if block else k % n
                    outs[part].write(line if line.endswith(b"\n") else line + b"\n")
                    k += 1
        for out, name in zip(outs, names):
            out.close()
            os.replace(name + ".partial", name)
    except BaseException as e:
        for out, name in zip(outs, names):  # no half-dealt partition may be reused by the next run
            out.close()
            if os.path.exists(name + ".partial"):
                os.remove(name + ".partial")
        if isinstance(e, OSError):  # partition files are written next to --input
            raise OSError(f"--partitions: cannot write {e.filename or names[0] + '.partial'} "
                          f"({e.strerror or e})") from None
        raise
    return names


def _sample_texts(path: str, keys: list[str], max_chars: int = 5_000_000):
    """Text to train a Punkt model on when none is installed (the start of the input)."""
    seen = 0
    for n, raw in iter_lines(path):
        try:
            doc = decode_document(path, n, raw, tuple(keys))
        except BadLine:
            continue
        for k in keys:
            value = doc[k] if isinstance(doc[k], str) else " ".join(doc[k])
            seen += len(value)
            yield value
        if seen >= max_chars:
            return


def _encode_partition(args, tok_cfg, options, path, prefix, workers, level, result_queue):
    try:
        stats = encode_file(path, prefix, tok_cfg, options, workers, args.log_interval, level,
                            _benchmark_documents(args))
        result_queue.put(("ok", stats))
    except BadLine as e:
        result_queue.put(("bad", (e.path, e.lineno, e.reason)))
    except (ValueError, OSError, RuntimeError) as e:  # one-line messages naming their file
        result_queue.put(("error", str(e)))
    except BaseException as e:  # reported by the parent
        result_queue.put(("error", f"{path}: {type(e).__name__}: {e}"))


def run(args) -> EncodeStats:
    tok_cfg = tokenizer_config_from_tool_args(args)
    level = "sentence" if args.split_sentences else "document"
    if args.partitions < 1 or args.workers < 1 or args.workers % args.partitions:
        raise SystemExit(f"error: --workers ({args.workers}) must be a positive multiple of --partitions "
                         f"({args.partitions})")
    inputs = [args.input] if args.partitions == 1 else make_partitions(
        args.input, args.partitions, args.keep_sequential_samples)
    duplicate = next((k for i, k in enumerate(args.json_keys) if k in args.json_keys[:i]), None)
    if duplicate is not None:
        raise SystemExit(f"error: --json-keys: {duplicate!r} given twice (each key writes one dataset)")
    for f in inputs:
        if os.path.isdir(f):
            raise SystemExit(f"error: --input {f}: is a directory, expected a JSONL file")
        if not os.path.isfile(f):
            raise SystemExit(f"error: --input {f}: no such file")
    params = None
    if args.split_sentences:
        params = punkt_parameters(args.lang, _sample_texts(inputs[0], args.json_keys))
    options = EncodeOptions(tuple(args.json_keys), args.append_eod, args.split_sentences, args.keep_newlines,
                            args.skip_bad_lines, params)
    if args.partitions == 1:
        return encode_file(args.input, args.output_prefix, tok_cfg, options, args.workers, args.log_interval,
                           level, _benchmark_documents(args))
    return _run_partitions(args, tok_cfg, options, inputs, level)


def _benchmark_documents(args) -> int | None:
    return args.max_documents if args.find_optimal_num_workers else None


def _check_benchmark_flags(args) -> list[int]:
    """The worker counts to run: --workers, or with --find-optimal-num-workers those of
    --workers-to-check that --partitions divides (Megatron-LM drops the others, saying so)."""
    if not args.find_optimal_num_workers:
        for flag, given in (("--workers-to-check", tuple(args.workers_to_check) != _WORKERS_TO_CHECK),
                            ("--max-documents", args.max_documents != _MAX_DOCUMENTS)):
            if given:
                raise SystemExit(f"error: {flag} needs --find-optimal-num-workers")
        return [args.workers]
    if args.max_documents < 1 or min(args.workers_to_check) < 1:
        raise SystemExit("error: --max-documents and --workers-to-check must be positive")
    counts = []
    for n in args.workers_to_check:
        if n % args.partitions:
            print(f"Removing num_workers ({n}) from workers list because it's not divisible by "
                  f"num_partitions ({args.partitions})")
        else:
            counts.append(n)
    if not counts:
        raise SystemExit(f"error: no --workers-to-check value is a multiple of --partitions "
                         f"({args.partitions})")
    return counts


def find_optimal_num_workers(args) -> list[tuple[int, float]]:
    """Encode the first --max-documents documents with each worker count into a temporary
    directory (removed); print Megatron-LM's ranking and return (workers, docs/s), fastest first."""
    results = []
    for workers in _check_benchmark_flags(args):
        print(f"Processing data with {workers} workers.")
        with tempfile.TemporaryDirectory(prefix="find_optimal_num_workers_") as tmp:
            trial = argparse.Namespace(**{**vars(args), "workers": workers,
                                          "output_prefix": os.path.join(tmp, "trial")})
            stats = run(trial)
        results.append((workers, stats.documents / max(stats.seconds, 1e-9)))
    results.sort(key=lambda r: r[1], reverse=True)
    print("\n-----------------------------------")
    print("Performance results (fastest → slowest):")
    for i, (workers, docs_per_s) in enumerate(results):
        print(f"{i + 1}. {workers} workers → avg. docs/s: {docs_per_s:.4f}")
    best, best_rate = results[0]
    print("\n-----------------------------------")
    print(f"The most optimal num of workers is {best} with avg. preprocessed docs/s: {best_rate:.4f}.")
    print("-----------------------------------")
    return results


def _run_partitions(args, tok_cfg, options, inputs, level) -> EncodeStats:
    start = time.time()
    ctx = mp.get_context()
    results = [ctx.Queue() for _ in inputs]
    prefixes = [f"{args.output_prefix}_{i}" for i in range(len(inputs))]
    procs = [ctx.Process(target=_encode_partition, args=(args, tok_cfg, options, path, prefix,
                                                         args.workers // args.partitions, level, q))
             for path, prefix, q in zip(inputs, prefixes, results)]
    for p in procs:
        p.start()
    outcomes = [q.get() for q in results]
    for p in procs:
        p.join()
    for kind, payload in outcomes:
        if kind == "bad":
            raise BadLine(*payload)
        if kind != "ok":
            raise RuntimeError(payload)
    stats = [payload for _, payload in outcomes]
    outputs = []
    for key in args.json_keys:
        final = f"{args.output_prefix}_{key}_{level}"
        parts = [f"{p}_{key}_{level}" for p in prefixes]
        builder = IndexedDatasetBuilder(final, Index(index_file_path(parts[0])).dtype)
        for part in parts:
            builder.add_index(part)
        builder.finalize()
        outputs.append(final)
    return EncodeStats(sum(s.documents for s in stats), sum(s.tokens for s in stats),
                       sum(s.nbytes for s in stats), time.time() - start, sum(s.bad_lines for s in stats),
                       outputs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.find_optimal_num_workers:
            find_optimal_num_workers(args)
            return 0
        _check_benchmark_flags(args)
        stats = run(args)
    except BadLine as e:
        print(f"error: {e} (pass --skip-bad-lines to skip and count such lines)", file=sys.stderr)
        return 1
    except (TokenizerError, OSError, RuntimeError, ValueError) as e:  # OSError: unwritable output
        print(f"error: {e}", file=sys.stderr)
        return 1
    mb = stats.nbytes / 1024 / 1024
    secs = max(stats.seconds, 1e-9)
    print(f"Done: {stats.documents} documents, {stats.tokens} tokens, {mb:.1f} MB in {stats.seconds:.1f} s "
          f"({stats.documents / secs:.1f} docs/s, {mb / secs:.2f} MB/s)", file=sys.stderr)
    if stats.bad_lines:
        print(f"Skipped {stats.bad_lines} bad lines", file=sys.stderr)
    for prefix in stats.outputs:
        print(f"Wrote {data_file_path(prefix)} and {index_file_path(prefix)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-pipeline benchmarks (not tests): preprocessing throughput and index-build time.

    python tools/bench_data.py preprocess --vocab-file vocab.json --merge-file merges.txt \\
        [--mb 100] [--workers 1 2] [--dir /tmp/bench_data]
    python tools/bench_data.py index [--documents 10000000] [--tokens 1000000000] [--seq-length 2048] \
        [--split 1,0,0] [--num-samples N]

`preprocess` writes a JSONL of at least --mb MB (the Python standard library's sources, repeated)
and runs tools/preprocess_data.py with the GPT-2 tokenizer for each worker count, reporting
documents/s and MB/s. `index` writes a synthetic `.idx` of --documents documents holding
--tokens tokens in total (with a sparse `.bin`) and times opening it, building the GPTDataset
indices of the train split (one epoch unless --num-samples asks for more), and loading them
back from the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

from megatron_lite.data.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron_lite.data.indexed_dataset import IndexedDataset, write_index  # noqa: E402
from megatron_lite.data.splits import split_indices, split_matrix  # noqa: E402


def make_jsonl(path: Path, megabytes: float) -> tuple[int, int]:
    sys.path.insert(0, str(ROOT / "tools"))
    import sysconfig

    from stdlib_to_jsonl import stdlib_sources

    docs = list(stdlib_sources(sysconfig.get_paths()["stdlib"]))
    count = size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            for rel, text in docs:
                line = json.dumps({"text": text, "path": rel}) + "\n"
                f.write(line)
                count += 1
                size += len(line.encode("utf-8"))
    return count, size


def bench_preprocess(args) -> None:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    src = d / "bench.jsonl"
    if not src.exists() or src.stat().st_size < args.mb * 1e6:
        count, size = make_jsonl(src, args.mb)
        print(f"wrote {src}: {count} documents, {size / 1e6:.1f} MB")
    size = src.stat().st_size
    docs = sum(1 for _ in open(src, "rb"))
    for workers in args.workers:
        cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
               "--output-prefix", str(d / f"bench_w{workers}"), "--tokenizer-type", "GPT2BPETokenizer",
               "--vocab-file", args.vocab_file, "--merge-file", args.merge_file, "--append-eod",
               "--workers", str(workers), "--log-interval", "100000"]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        secs = time.time() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / secs
        # cores used < workers means other processes took the CPUs (the machine is shared)
        print(f"preprocess --workers {workers}: {docs} docs, {size / 1e6:.1f} MB in {secs:.1f} s -> "
              f"{docs / secs:.0f} docs/s, {size / 1e6 / secs:.2f} MB/s (cores used {cpu:.2f}, "
              f"load average before {load:.1f})")


def bench_index(args) -> None:
    rng = np.random.default_rng(0)
    n, total = args.documents, args.tokens
    # Lengths around total/n (uniform in [1, 2*mean - 1]), then nudged so they sum to `total`.
    mean = total // n
    lengths = rng.integers(1, 2 * mean, size=n, dtype=np.int64)
    diff = total - int(lengths.sum())
    lengths[np.argsort(lengths)[len(lengths) - abs(diff):]] += np.sign(diff)  # the longest absorb it
    assert int(lengths.sum()) == total and lengths.min() >= 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        prefix = os.path.join(tmp, "synthetic")
        t = time.time()
        write_index(prefix + ".idx", np.uint16, lengths.astype(np.int32), np.arange(n + 1))
        with open(prefix + ".bin", "wb") as f:
            f.truncate(total * 2)  # sparse: the index build never reads tokens
        print(f"wrote synthetic {n} documents / {total} tokens in {time.time() - t:.1f} s")
        t = time.time()
        low = IndexedDataset(prefix)
        _ = low.fingerprint
        t_open = time.time() - t
        cfg = GPTDatasetConfig(sequence_length=args.seq_length, random_seed=1234, eod=0, pad=-1,
                               split=args.split, split_matrix=tuple(split_matrix(args.split)),
                               path_to_cache=os.path.join(tmp, "cache"))
        docs = split_indices(cfg.split_matrix[0], len(low))
        t = time.time()
        ds = GPTDataset(low, prefix, docs, args.num_samples, "train", cfg)
        t_build = time.time() - t
        t = time.time()
        again = GPTDataset(IndexedDataset(prefix), prefix, docs, args.num_samples, "train", cfg)
        t_load = time.time() - t
        assert not again.built_anew and len(again) == len(ds)
        print(f"index: open+validate {t_open:.2f} s; build train indices ({len(docs)} documents, "
              f"{ds.document_index.size} document-index entries, {len(ds)} samples of {args.seq_length}) "
              f"{t_build:.2f} s incl. saving; cached load "
              f"{t_load:.2f} s (load average: {os.getloadavg()[0]:.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("preprocess")
    p.add_argument("--vocab-file", required=True)
    p.add_argument("--merge-file", required=True)
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench_data"))
    p = sub.add_parser("index")
    p.add_argument("--documents", type=int, default=10_000_000)
    p.add_argument("--tokens", type=int, default=1_000_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--split", default="1,0,0", help="The train split's share is indexed.")
    p.add_argument("--num-samples", type=int, default=None, help="Requested samples (default one epoch).")
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args(argv)
    (bench_preprocess if args.what == "preprocess" else bench_index)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

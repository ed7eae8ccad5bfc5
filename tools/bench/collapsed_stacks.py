"""Where a process's host time goes, from py-spy's collapsed stacks (`py-spy record --format raw`),
one line per distinct stack: `frame;frame;...;frame COUNT`, rooted at `process PID:"cmd"` (with
--subprocesses) and `thread (TID): NAME` (with --threads).

    python tools/bench/collapsed_stacks.py STACKS.txt [--within train_step] [--top 25]

For the --threads threads with most samples (optionally only stacks through a frame containing
--within, e.g. the training step; CUDA backward runs on autograd's own thread, not under the
step's frames), prints its sample count, then the frames with the most samples
beneath them (inclusive) and the leaf frames (self), as a share of that thread's samples.
Issue 13: a TP2 step was host-bound on 2xH200 at 340-490 ms per 16 samples while one GPU's
was not, and enqueueing its ~1,000 collectives explained only 40-50 ms of that.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

_ROOT = re.compile(r"^(process \d+:.*?|thread \(\w+\):[^;]*)$")


_LINE = re.compile(r":\d+\)$")


def parse(lines, functions: bool = False) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks by root (`process ...;thread ...` joined, or '' when neither was recorded):
    each a (frames from outermost, samples) pair. `functions`: frames without their line
    numbers, so that a function's lines add up."""
    by_root: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise SystemExit(f"error: not a collapsed-stack line (no trailing count): {line[:80]!r}")
        frames = stack.split(";")
        if functions:
            frames = [_LINE.sub(")", f) for f in frames]
        roots = []
        while frames and _ROOT.match(frames[0]):
            roots.append(frames.pop(0))
        by_root[";".join(roots)].append((frames, int(count)))
    return by_root


def summarize(stacks: list[tuple[list[str], int]], within: str | None = None):
    """(total samples, inclusive Counter, self Counter) over the stacks that pass through a
    frame containing `within` (all of them when None); a frame recursing counts once."""
    total, inclusive, leaf = 0, Counter(), Counter()
    for frames, n in stacks:
        if within is not None and not any(within in f for f in frames):
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            leaf[frames[-1]] += n
    return total, inclusive, leaf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stacks")
    p.add_argument("--within", default=None, help="keep stacks through a frame containing this")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--functions", action="store_true", help="aggregate a function's lines")
    p.add_argument("--threads", type=int, default=8, help="this many threads, most samples first")
    a = p.parse_args()
    try:
        with open(a.stacks) as f:
            by_root = parse(f, a.functions)
    except OSError as e:
        raise SystemExit(f"error: cannot read {a.stacks}: {e.strerror}") from None
    summaries = [(root, *summarize(stacks, a.within)) for root, stacks in by_root.items()]
    summaries.sort(key=lambda r: -r[1])  # busiest threads first
    for root, total, inclusive, leaf in summaries[:a.threads]:
        if not total:
            continue
        print(f"== {root or '(all)'}: {total} samples" + (f" through {a.within!r}" if a.within else ""))
        for title, counter in (("inclusive", inclusive), ("self", leaf)):
            print(f"  {title}:")
            for frame, n in counter.most_common(a.top):
                print(f"    {100 * n / total:5.1f}%  {frame[:150]}")


if __name__ == "__main__":
    main()

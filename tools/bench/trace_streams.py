"""Where a profiled GPU's time goes: per-stream busy time, communication time hidden behind
compute or exposed, idle time, and kernel time by class, from a Chrome trace of
`torch.profiler` (`tools/benchmark.py --profile-trace DIR` writes one per rank; so does
pretrain's `--profile --use-pytorch-profiler`, under `--tensorboard-dir`).

    python tools/bench/trace_streams.py DIR/rank0.json [DIR/rank1.json ...]

Communication is NCCL kernels, symmetric-memory barriers and copies (the copy engines'
transfers of `--tp-comm-overlap`, and local copies, which a trace does not tell apart).
"Exposed" is time when communication runs and no compute kernel does: what overlap could still
win. "Idle" is time with no kernel at all (host-bound gaps, waits).
With host events in the trace (`--profile-trace` records them), "host waited" is the time the
host spent blocked in CUDA synchronize calls: a GPU that idles while its host hardly ever
waits is starved by the host (launch-bound), not by a dependency.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

# Kernel classes by name fragment, first match wins; everything else is "other". "barrier":
# symmetric memory's cross-GPU barriers (--tp-comm-overlap's copy-engine path), a wait for the
# peers; copies (gpu_memcpy events, the copy engines' transfers among them) are "memcpy".
CLASSES = (
    ("nccl", ("nccl",)),
    ("barrier", ("barrier",)),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
)
COMMUNICATION = ("nccl", "barrier", "memcpy")


def kernel_class(name: str, category: str = "kernel") -> str:
    if category == "gpu_memcpy":
        return "memcpy"
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) spans, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def gpu_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X"
            and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def host_runtime(events: list[dict]) -> tuple[float, int]:
    """(ms blocked in CUDA synchronize calls, number of kernel launches) from the host events
    of a trace; (0, 0) without them."""
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    waited = sum(e["dur"] for e in runtime if "Synchronize" in e["name"])
    launches = sum(1 for e in runtime if "LaunchKernel" in e["name"])
    return waited / 1e3, launches


def summarize(path: str) -> dict:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    ev = gpu_events(events)
    waited, launches = host_runtime(events)
    if not ev:
        raise SystemExit(f"error: {path} holds no GPU kernels")
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in ev]
    window = max(e for _, e in spans) - min(s for s, _ in spans)
    is_comm = [kernel_class(e["name"], e["cat"]) in COMMUNICATION for e in ev]
    comm = [(e["ts"], e["ts"] + e["dur"]) for e, c in zip(ev, is_comm) if c]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e, c in zip(ev, is_comm) if not c]
    busy, comm_u, comp_u = union_length(spans), union_length(comm), union_length(compute)
    by_stream, by_class, by_name = defaultdict(list), defaultdict(float), defaultdict(lambda: [0, 0.0])
    for e in ev:
        by_stream[e.get("args", {}).get("stream", e.get("tid"))].append((e["ts"], e["ts"] + e["dur"]))
        by_class[kernel_class(e["name"], e["cat"])] += e["dur"]
        by_name[e["name"][:90]][0] += 1
        by_name[e["name"][:90]][1] += e["dur"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    gaps = idle_gaps(ev)[:10]
    return {
        "file": path, "window_ms": window / 1e3, "busy_ms": busy / 1e3,
        "idle_ms": (window - busy) / 1e3, "compute_ms": comp_u / 1e3, "comm_ms": comm_u / 1e3,
        "comm_exposed_ms": (busy - comp_u) / 1e3,
        "streams": {str(k): round(union_length(v) / 1e3, 2) for k, v in by_stream.items()},
        "kernel_ms_by_class": {k: round(v / 1e3, 2) for k, v in sorted(by_class.items())},
        "top_kernels": [(n, c, round(t / 1e3, 2)) for n, (c, t) in top],
        "idle_gaps": gaps, "idle_gaps_over_50us_ms": round(sum(
            g for g, _, _ in idle_gaps(ev) if g > 50) / 1e3, 2),
        "host_waited_ms": round(waited, 2), "kernel_launches": launches,
    }


def idle_gaps(ev: list[dict]) -> list[tuple[float, str, str]]:
    """(gap us, kernel before, kernel after) for every stretch with no kernel on any stream,
    longest first."""
    out, end, last = [], None, ""
    for e in sorted(ev, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            out.append((round(e["ts"] - end, 1), last[:60], e["name"][:60]))
        if end is None or e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e["name"]
    return sorted(out, reverse=True)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python tools/bench/trace_streams.py TRACE.json [...]")
    for path in sys.argv[1:]:
        r = summarize(path)
        print(f"{r['file']}: window {r['window_ms']:.1f} ms, busy {r['busy_ms']:.1f}, "
              f"idle {r['idle_ms']:.1f}, compute {r['compute_ms']:.1f}, communication "
              f"{r['comm_ms']:.1f} (exposed {r['comm_exposed_ms']:.1f})")
        print(f"  kernel time by class (ms, summed over streams): {r['kernel_ms_by_class']}")
        print(f"  busy per stream (ms): {r['streams']}")
        print(f"  host: {r['host_waited_ms']} ms blocked in CUDA synchronize calls, "
              f"{r['kernel_launches']} kernel launches (0, 0: no host events in the trace)")
        print(f"  idle in gaps over 50 us: {r['idle_gaps_over_50us_ms']} ms; "
              "longest gaps (us, before, after):")
        for gap in r["idle_gaps"]:
            print(f"    {gap}")
        for name, count, ms in r["top_kernels"]:
            print(f"  {ms:9.2f} ms {count:6d}x  {name}")


if __name__ == "__main__":
    main()

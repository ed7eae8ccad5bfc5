"""Pipeline bubble from a `--pipeline-trace-file` Chrome trace.

    python tools/pipeline_trace_stats.py trace.json [--skip-steps 1] [--group-size N]
    python tools/pipeline_trace_stats.py dpp.json --compare static.json   # --use-dpp vs static

Prints the measured bubble (idle / compute per rank, idle = the step's span over all ranks
minus the rank's compute), the mean forward/backward time per pipeline rank, the bubble the
static schedule and the dynamic `--use-dpp` schedule (both orders) would have with exactly
those times and free transfers (so stage imbalance is separated from executor overhead), the
balanced theory (PP-1)/(VPP*M) of spec §6, and whether the traced order is the static
schedule's (a `--use-dpp` run departs from it where inputs arrive in another order).
`--compare` reads a second trace of the same shape (e.g. the static run) and prints both
measured step spans and bubbles side by side.
"""
from __future__ import annotations

import argparse

from megatron_lite.pipeline_parallel.dynamic import ORDERS
from megatron_lite.pipeline_parallel.trace import (
    bubble_stats,
    mean_durations,
    read_chrome_trace,
    simulated_bubble,
    static_order_mismatches,
)


def _shape(events) -> tuple[int, int, int]:
    return (max(e.pp_rank for e in events) + 1, max(e.chunk for e in events) + 1,
            max(e.microbatch for e in events) + 1)


def describe(path: str, skip_steps: int, group_size: int | None) -> list[str]:
    events = read_chrome_trace(path)
    pp, vpp, m = _shape(events)
    stats = bubble_stats(events, skip_steps)
    durations = mean_durations(events, skip_steps)
    differ, runs = static_order_mismatches(events, group_size, skip_steps)
    simulated = " | ".join(f"dynamic {o} {simulated_bubble(pp, vpp, m, durations, group_size, o):.4f}"
                           for o in ORDERS)
    return [
        f"{path}: PP {pp}, VPP {vpp}, M {m}: {stats.steps} steps, span {stats.mean_span_ms:.2f} ms, "
        f"compute {stats.mean_busy_ms:.2f} ms per rank and step",
        "mean ms per compute: " + ", ".join(f"pp{r} {op} {durations[(r, op)]:.3f}"
                                            for r in range(pp) for op in "FB"),
        f"order: {'the static schedule' if not differ else 'dynamic'} ({differ} of {runs} rank-steps "
        "differ from the static order)",
        f"bubble measured {stats.bubble_fraction:.4f} | with these times: static "
        f"{simulated_bubble(pp, vpp, m, durations, group_size):.4f} | {simulated} | "
        f"theory (PP-1)/(VPP*M) {(pp - 1) / (vpp * m):.4f}",
    ]


def compare(path: str, baseline: str, skip_steps: int) -> str:
    ours, base = (bubble_stats(read_chrome_trace(p), skip_steps) for p in (path, baseline))
    return (f"step span {ours.mean_span_ms:.2f} ms vs {base.mean_span_ms:.2f} ms "
            f"({base.mean_span_ms / ours.mean_span_ms:.3f}x); bubble {ours.bubble_fraction:.4f} vs "
            f"{base.bubble_fraction:.4f} ({path} vs {baseline})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--skip-steps", type=int, default=1, help="leading steps left out (warm-up)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="--microbatch-group-size-per-virtual-pipeline-stage of the run (default PP)")
    parser.add_argument("--compare", default=None, help="a second trace (e.g. the static run) to set beside")
    args = parser.parse_args(argv)
    lines = describe(args.trace, args.skip_steps, args.group_size)
    if args.compare:
        lines += describe(args.compare, args.skip_steps, args.group_size)
        lines.append(compare(args.trace, args.compare, args.skip_steps))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

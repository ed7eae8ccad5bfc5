"""Pipeline bubble from a `--pipeline-trace-file` Chrome trace.

    python tools/pipeline_trace_stats.py trace.json [--skip-steps 1] [--group-size N]

Prints the measured bubble (idle / compute per rank, idle = the step's span over all ranks
minus the rank's compute), the mean forward/backward time per pipeline rank, the bubble the
schedule would have with exactly those times and free transfers (so stage imbalance is
separated from executor overhead), and the balanced theory (PP-1)/(VPP*M) of spec §6.
"""
from __future__ import annotations

import argparse

from megatron_lite.pipeline_parallel.trace import (
    bubble_stats,
    mean_durations,
    read_chrome_trace,
    simulated_bubble,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--skip-steps", type=int, default=1, help="leading steps left out (warm-up)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="--microbatch-group-size-per-virtual-pipeline-stage of the run (default PP)")
    args = parser.parse_args(argv)
    events = read_chrome_trace(args.trace)
    pp = max(e.pp_rank for e in events) + 1
    vpp = max(e.chunk for e in events) + 1
    m = max(e.microbatch for e in events) + 1
    stats = bubble_stats(events, args.skip_steps)
    durations = mean_durations(events, args.skip_steps)
    print(f"PP {pp}, VPP {vpp}, M {m}: {stats.steps} steps, span {stats.mean_span_ms:.2f} ms, "
          f"compute {stats.mean_busy_ms:.2f} ms per rank and step")
    print("mean ms per compute: " + ", ".join(f"pp{r} {op} {durations[(r, op)]:.3f}"
                                              for r in range(pp) for op in "FB"))
    print(f"bubble measured {stats.bubble_fraction:.4f} | schedule with these times "
          f"{simulated_bubble(pp, vpp, m, durations, args.group_size):.4f} | "
          f"theory (PP-1)/(VPP*M) {(pp - 1) / (vpp * m):.4f}")


if __name__ == "__main__":
    main()

"""The `--pipeline-model-parallel-layout` with the shortest simulated pipeline step.

From a measured trace (`--pipeline-trace-file` of a run with the same PP, VPP and micro-batches;
`--layout` the layout it ran with, default the even split):

    python tools/pipeline_layout_search.py trace.json --num-layers 24 \
        --layout "Et*4|t*3|t*3|t*3|t*3|t*3|t*3|t*2L"

or from costs in ms per micro-batch (forward backward), PP, VPP and M given:

    python tools/pipeline_layout_search.py --num-layers 24 --pipeline-model-parallel-size 2 \
        --num-virtual-stages-per-pipeline-rank 4 --num-micro-batches 8 \
        --layer-ms 1.4 2.9 --head-ms 4.3 8.6

Prints the costs, the traced step against the same layout simulated with them (what the
executor and the transfers add beyond the schedule), then the best layouts found
(pipeline_parallel/layout_search.py) with their simulated step and bubble, each as the flag
value to pass to pretrain_gpt.py / pretrain_llama.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_lite.pipeline_parallel.layout import build_layout  # noqa: E402
from megatron_lite.pipeline_parallel.layout_search import (  # noqa: E402
    StageCosts,
    fit_costs,
    layout_string,
    search_layouts,
    simulate_layout,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", nargs="?", help="--pipeline-trace-file of a run (costs fitted from it)")
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--layout", default=None, help="the traced run's --pipeline-model-parallel-layout "
                   "(default: the even split); also a start of the search")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None, dest="pp")
    p.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None, dest="vpp")
    p.add_argument("--num-micro-batches", type=int, default=None, dest="m")
    p.add_argument("--group-size", type=int, default=None,
                   help="--microbatch-group-size-per-virtual-pipeline-stage (default PP)")
    p.add_argument("--layer-ms", type=float, nargs=2, default=None, metavar=("F", "B"))
    p.add_argument("--embedding-ms", type=float, nargs=2, default=None, metavar=("F", "B"),
                   help="what the first stage adds (default 0 0)")
    p.add_argument("--head-ms", type=float, nargs=2, default=None, metavar=("F", "B"),
                   help="what the last stage adds: final norm, output layer, loss (default 0 0)")
    p.add_argument("--try-group-sizes", type=int, nargs="+", default=(), metavar="N",
                   help="also search with these --microbatch-group-size-per-virtual-pipeline-stage "
                   "values and print the best layout of each")
    p.add_argument("--latency-ms", type=float, default=0.0, help="a transfer's latency in the simulation")
    p.add_argument("--skip-steps", type=int, default=1, help="leading traced steps left out (warm-up)")
    p.add_argument("--top", type=int, default=5)
    return p


def _from_trace(args) -> tuple[StageCosts, list[int], float]:
    """Costs fitted from the trace, the traced stage sizes and its mean step span; sets the
    shape (PP, VPP, M) from the trace."""
    # Imported here: trace.py needs torch, given costs do not.
    from megatron_lite.pipeline_parallel.trace import bubble_stats, mean_durations, read_chrome_trace

    given = [flag for flag, value in (("--layer-ms", args.layer_ms), ("--embedding-ms", args.embedding_ms),
                                      ("--head-ms", args.head_ms)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: the costs come from the trace {args.trace}; give either")
    try:
        events = read_chrome_trace(args.trace)
        shape = {"--pipeline-model-parallel-size": ("pp", max(e.pp_rank for e in events) + 1),
                 "--num-virtual-stages-per-pipeline-rank": ("vpp", max(e.chunk for e in events) + 1),
                 "--num-micro-batches": ("m", max(e.microbatch for e in events) + 1)}
        span = bubble_stats(events, args.skip_steps).mean_span_ms
        chunk_ms = mean_durations(events, args.skip_steps, per_chunk=True)
    except (ValueError, KeyError, TypeError, IndexError) as e:  # not a pipeline trace
        raise ValueError(f"{args.trace}: not a --pipeline-trace-file trace ({type(e).__name__}: {e})") from e
    for flag, (attr, traced) in shape.items():
        if getattr(args, attr) not in (None, traced):
            raise ValueError(f"{flag} {getattr(args, attr)}: the trace {args.trace} has {traced}")
        setattr(args, attr, traced)
    sizes = _sizes(args)
    return fit_costs(chunk_ms, sizes, args.pp), sizes, span


def _sizes(args) -> list[int]:
    """Layers per virtual stage of `--layout`, or of the even split (layout.py's rules)."""
    layout = build_layout(args.num_layers, args.pp, args.vpp, layout=args.layout)
    if args.vpp is None:  # given costs: the layout's stages set the VPP size
        args.vpp = layout.vpp_size
    if layout.vpp_size != args.vpp:
        raise ValueError(f"--layout {args.layout}: {len(layout.stage_layers)} stages, not PP {args.pp} x "
                         f"VPP {args.vpp}")
    return [len(s) for s in layout.stage_layers]


def report(args) -> list[str]:
    """The lines the tool prints (ValueError, naming the flag or file, for bad input)."""
    measured, lines = None, []
    if args.trace:
        costs, sizes, measured = _from_trace(args)
    else:
        given = (("--pipeline-model-parallel-size", args.pp), ("--num-micro-batches", args.m),
                 ("--layer-ms", args.layer_ms))
        missing = [flag for flag, value in given if value is None]
        if args.vpp is None and args.layout is None:
            missing.append("--num-virtual-stages-per-pipeline-rank (or --layout)")
        if missing:
            raise ValueError(f"without a trace, give {', '.join(missing)}")
        costs = StageCosts(tuple(args.layer_ms), tuple(args.embedding_ms or (0.0, 0.0)),
                           tuple(args.head_ms or (0.0, 0.0)))
        sizes = _sizes(args)
    fmt = lambda fb: f"F {fb[0]:.3f} B {fb[1]:.3f}"  # noqa: E731
    lines.append(f"PP {args.pp}, VPP {args.vpp}, M {args.m}; ms per micro-batch: layer {fmt(costs.layer)}, "
                 f"embedding {fmt(costs.embedding)}, head {fmt(costs.head)}")
    current = simulate_layout(sizes, args.pp, args.m, costs, args.group_size, args.latency_ms)
    line = (f"{'traced' if args.trace else 'given'} layout {layout_string(sizes)}: simulated "
            f"{current.span:.2f} ms, bubble {current.bubble:.4f}")
    if measured is not None:
        line += f"; traced {measured:.2f} ms ({measured / current.span:.3f}x the simulation)"
    lines.append(line)
    found = search_layouts(args.num_layers, args.pp, args.vpp, args.m, costs, group_size=args.group_size,
                           latency=args.latency_ms, starts=(sizes,), top=args.top)
    lines += [_found_line(args, costs, best, current.span, args.group_size) for _, best in found]
    for n in args.try_group_sizes:
        _, best = search_layouts(args.num_layers, args.pp, args.vpp, args.m, costs, group_size=n,
                                 latency=args.latency_ms, starts=(sizes,), top=1)[0]
        lines.append(_found_line(args, costs, best, current.span, n) +
                     f" --microbatch-group-size-per-virtual-pipeline-stage {n}")
    return lines


def _found_line(args, costs: StageCosts, sizes: list[int], baseline: float, group_size: int | None) -> str:
    """A searched layout: its simulated step, against the given layout's, bubble, and flag."""
    sim = simulate_layout(sizes, args.pp, args.m, costs, group_size, args.latency_ms)
    return (f"{sim.span:9.2f} ms ({baseline / sim.span:.3f}x)  bubble {sim.bubble:.4f}  "
            f"--pipeline-model-parallel-layout \"{layout_string(sizes)}\"")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        print("\n".join(report(args)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pipeline timeline (`--pipeline-trace`, `--pipeline-trace-file`): start and end of every
forward and backward with its (micro-batch, chunk), per rank, as log lines, as a Chrome trace
(chrome://tracing, Perfetto) and as measured bubble fractions to set beside the theoretical
`(PP - 1) / (VPP * M)` (spec §6) and beside the simulated static and dynamic (`--use-dpp`)
schedules with the measured compute times.

On CUDA the times come from events recorded on the compute stream, so a stage's idle time
(waiting for its input) shows as a gap without the trace adding host synchronisation inside
the step; the step boundaries synchronise once to pin the events to the wall clock, which is
shared by all ranks of a host.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST
from megatron_lite.pipeline_parallel.schedules import compute_order
from megatron_lite.pipeline_parallel.simulate import simulate, stage_durations


@dataclass(frozen=True)
class TraceEvent:
    rank: int  # global rank
    pp_rank: int
    step: int  # 0-based step of this trace
    op: str  # "F" | "B"
    microbatch: int
    chunk: int
    start_us: float  # wall clock, microseconds
    end_us: float


class PipelineTrace:
    def __init__(self, rank: int, pp_rank: int, device: torch.device, max_steps: int = 200):
        self.rank, self.pp_rank, self.max_steps = rank, pp_rank, max_steps
        self.cuda = torch.device(device).type == "cuda"
        self.events: list[TraceEvent] = []
        self.step_starts: list[float] = []
        self._pending: list = []
        self._active = False

    @property
    def steps(self) -> int:
        return len(self.step_starts)

    def start_step(self) -> None:
        self._active = self.steps < self.max_steps
        if not self._active:
            return
        self._pending = []
        if self.cuda:
            torch.cuda.synchronize()
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        self.step_starts.append(time.time() * 1e6)

    @contextlib.contextmanager
    def span(self, op: str, microbatch: int, chunk: int):
        if not self._active:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.time() * 1e6
            yield
            end = time.time() * 1e6
        self._pending.append((op, microbatch, chunk, start, end))

    def finish_step(self) -> None:
        if not self._active:
            return
        t0 = self.step_starts[-1]
        if self.cuda:
            torch.cuda.synchronize()
        for op, mb, chunk, start, end in self._pending:
            if self.cuda:
                start = t0 + self._origin.elapsed_time(start) * 1e3
                end = t0 + self._origin.elapsed_time(end) * 1e3
            self.events.append(TraceEvent(self.rank, self.pp_rank, self.steps - 1, op, mb, chunk, start, end))
        self._pending = []
        self._active = False

    def step_line(self, step: int = -1) -> str:
        """One log line: this rank's computes of a step, in ms from the step's start."""
        step = step % self.steps
        t0 = self.step_starts[step]
        parts = [f"{e.op}{e.microbatch}.{e.chunk} {(e.start_us - t0) / 1e3:.3f}-{(e.end_us - t0) / 1e3:.3f}"
                 for e in self.events if e.step == step]
        return (f"[pipeline trace] step {step + 1} rank {self.rank} (pp {self.pp_rank}) "
                f"[op mb.chunk start-end ms]: " + " | ".join(parts))


def gather_events(trace: PipelineTrace, group=None) -> list[TraceEvent]:
    """All ranks' events (collective over `group`, default the world)."""
    mine = [asdict(e) for e in trace.events]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(trace.events)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return [TraceEvent(**e) for part in parts for e in part]


def chrome_trace(events: list[TraceEvent]) -> dict:
    """Chrome trace-event JSON: one process row per global rank, ordered by pipeline rank."""
    out = []
    for rank, pp_rank in sorted({(e.rank, e.pp_rank) for e in events}):
        out.append({"name": "process_name", "ph": "M", "pid": rank,
                    "args": {"name": f"pp rank {pp_rank} (global rank {rank})"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank,
                    "args": {"sort_index": pp_rank * 100000 + rank}})
    for e in events:
        name = f"{'forward' if e.op == 'F' else 'backward'} mb {e.microbatch} chunk {e.chunk}"
        out.append({"name": name, "cat": e.op, "ph": "X", "pid": e.rank, "tid": 0, "ts": e.start_us,
                    "dur": e.end_us - e.start_us,
                    "args": {"step": e.step, "microbatch": e.microbatch, "chunk": e.chunk,
                             "pp_rank": e.pp_rank}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: list[TraceEvent], path: str) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(events), f)


def read_chrome_trace(path: str) -> list[TraceEvent]:
    with open(path) as f:
        data = json.load(f)
    # pid -> pp rank from the row names, for traces written before events carried "pp_rank"
    pp_of = {e["pid"]: int(e["args"]["name"].split()[2]) for e in data["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    return [TraceEvent(e["pid"], e["args"].get("pp_rank", pp_of.get(e["pid"], 0)), e["args"]["step"],
                       e["cat"], e["args"]["microbatch"], e["args"]["chunk"], e["ts"], e["ts"] + e["dur"])
            for e in data["traceEvents"] if e["ph"] == "X"]


@dataclass(frozen=True)
class BubbleStats:
    steps: int
    mean_busy_ms: float  # compute time per rank and step
    mean_span_ms: float  # first start to last end over all ranks, per step
    bubble_fraction: float  # mean over ranks and steps of idle / busy (theory: (PP-1)/(VPP M))


def bubble_stats(events: list[TraceEvent], skip_steps: int = 1) -> BubbleStats:
    """Idle over compute time per rank, with idle = the step's span across all ranks minus the
    rank's own compute; the first `skip_steps` steps (warm-up, allocator) are left out."""
    steps = sorted({e.step for e in events if e.step >= skip_steps})
    busy_all, spans, fractions = [], [], []
    for s in steps:
        evs = [e for e in events if e.step == s]
        span = max(e.end_us for e in evs) - min(e.start_us for e in evs)
        spans.append(span)
        for rank in {e.rank for e in evs}:
            busy = sum(e.end_us - e.start_us for e in evs if e.rank == rank)
            busy_all.append(busy)
            fractions.append((span - busy) / busy)
    if not steps:
        raise ValueError("no traced steps after the warm-up steps")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return BubbleStats(len(steps), mean(busy_all) / 1e3, mean(spans) / 1e3, mean(fractions))


def simulated_bubble(pp: int, vpp: int, m: int, durations: dict, group_size: int | None = None,
                     dynamic_order: str | None = None) -> float:
    """The bubble (idle / compute, averaged over pipeline ranks) the schedule would have if
    every compute took `durations[(pp_rank, "F" | "B")]` and transfers were free: the
    theoretical `(PP-1)/(VPP*M)` for equal stages, and what to expect from a measured,
    possibly unbalanced, per-stage cost. `dynamic_order`: the `--use-dpp` schedule with that
    order instead of the static one (simulate.py)."""
    return simulate(pp, vpp, m, stage_durations(durations), dynamic=dynamic_order is not None,
                    order=dynamic_order or BREADTH_FIRST, group_size=group_size).bubble


def static_order_mismatches(events: list[TraceEvent], group_size: int | None = None,
                            skip_steps: int = 1) -> tuple[int, int]:
    """(rank-steps whose compute order differs from the static schedule's, rank-steps): how
    often a `--use-dpp` run departed from the fixed order."""
    pp = max(e.pp_rank for e in events) + 1
    vpp, m = max(e.chunk for e in events) + 1, max(e.microbatch for e in events) + 1
    runs: dict = {}
    for e in sorted(events, key=lambda e: e.start_us):
        if e.step >= skip_steps:
            runs.setdefault((e.rank, e.step), (e.pp_rank, []))[1].append((e.op, e.microbatch, e.chunk))
    static = {r: [(op.value, mb, c) for op, mb, c in compute_order(pp, vpp, m, r, group_size)]
              for r in range(pp)}
    return sum(order != static[r] for r, order in runs.values()), len(runs)


def mean_durations(events: list[TraceEvent], skip_steps: int = 1, per_chunk: bool = False) -> dict:
    """Mean compute time in ms per (pp rank, "F" | "B"), or per (pp rank, chunk, "F" | "B")
    with `per_chunk` (chunks of one rank may hold different layers: layout_search.fit_costs)."""
    acc: dict = {}
    for e in events:
        if e.step >= skip_steps:
            key = (e.pp_rank, e.chunk, e.op) if per_chunk else (e.pp_rank, e.op)
            acc.setdefault(key, []).append((e.end_us - e.start_us) / 1e3)
    return {k: sum(v) / len(v) for k, v in acc.items()}

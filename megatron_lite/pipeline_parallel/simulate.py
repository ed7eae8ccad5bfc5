"""Timed simulation of one step of a pipeline schedule, static (schedules.py) or dynamic
(dynamic.py): every compute takes the time a `duration(pp_rank, task)` callback says, a message
arrives `latency` after its producer ends, and each rank starts its next compute as soon as
it is idle and one is ready. Gives the order each rank ran, the step's span and the bubble:
what to expect from measured per-stage times (tools/pipeline_trace_stats.py), and a cheap way
to run the dynamic policy under hundreds of randomized stage delays (tests), where a deadlock
shows as `ScheduleDeadlock`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_lite.pipeline_parallel.dynamic import BREADTH_FIRST, DynamicPlan, DynamicState, Task
from megatron_lite.pipeline_parallel.schedules import Op, compute_order

Duration = Callable[[int, Task], float]


class ScheduleDeadlock(RuntimeError):
    """No rank can run anything, yet the step is not finished."""


@dataclass(frozen=True)
class Ran:
    task: Task
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    timelines: list  # per pipeline rank: list of Ran, in execution order
    span: float  # first start to last end
    peak_in_flight: list  # per rank: most forwards whose backward had not run

    @property
    def bubble(self) -> float:
        """Idle over compute time, averaged over ranks (the measure of trace.bubble_stats)."""
        busy = [sum(r.end - r.start for r in line) for line in self.timelines]
        return sum((self.span - b) / b for b in busy) / len(busy)


class _Static:
    """A fixed order as a picker: the next entry, if its input has arrived."""

    def __init__(self, plan: DynamicPlan, order: list[Task]):
        self.plan, self.order, self.pc = plan, order, 0
        self.in_flight = 0

    @property
    def finished(self) -> bool:
        return self.pc == len(self.order)

    def pick(self, arrived) -> Task | None:
        if self.finished:
            return None
        task = self.order[self.pc]
        message = self.plan.input_of(task)
        return task if message is None or arrived(message) else None

    def complete(self, task: Task) -> None:
        self.pc += 1
        self.in_flight += 1 if task.op is Op.FORWARD else -1


def simulate(pp: int, vpp: int, m: int, duration: Duration, *, dynamic: bool = True,
             order: str = BREADTH_FIRST, group_size: int | None = None, latency: float = 0.0,
             pickers: list | None = None) -> SimResult:
    """One step on every pipeline rank; `dynamic=False` runs the static schedule of spec §6.
    `pickers` replaces the per-rank policies (objects like DynamicState: plan, pick, complete,
    finished, in_flight), e.g. to show what a variant of the policy would do."""
    if pickers is None:
        plans = [DynamicPlan(pp, vpp, m, r, group_size, order) for r in range(pp)]
        static = [[Task(*x) for x in compute_order(pp, vpp, m, r, group_size)] for r in range(pp)]
        pickers = [DynamicState(p) if dynamic else _Static(p, static[r]) for r, p in enumerate(plans)]
    plans = [p.plan for p in pickers]
    arrivals: list[dict] = [{} for _ in range(pp)]  # per receiving rank: Message -> arrival time
    free = [0.0] * pp
    timelines: list[list[Ran]] = [[] for _ in range(pp)]
    peaks = [0] * pp
    while not all(p.finished for p in pickers):
        best = None  # (start, rank, task): the earliest compute any rank can start
        for r, picker in enumerate(pickers):
            start, task = _next_start(picker, arrivals[r], free[r])
            if task is not None and (best is None or (start, r) < best[:2]):
                best = (start, r, task)
        if best is None:
            raise ScheduleDeadlock(f"PP {pp} VPP {vpp} M {m}: ranks stuck after "
                                   f"{[len(t) for t in timelines]} computes")
        start, r, task = best
        end = start + duration(r, task)
        pickers[r].complete(task)
        peaks[r] = max(peaks[r], pickers[r].in_flight)
        free[r] = end
        timelines[r].append(Ran(task, start, end))
        out = plans[r].output_of(task)
        if out is not None:
            arrivals[out[0]][out[1]] = end + latency
    first = min(line[0].start for line in timelines if line)
    return SimResult(timelines, max(free) - first, peaks)


def _next_start(picker, arrivals: dict, free: float) -> tuple[float, Task | None]:
    """When this rank starts its next compute (and which), from the messages known so far: at
    `free` if something is ready then, else at the first arrival that makes something ready."""
    task = picker.pick(lambda msg: arrivals.get(msg, float("inf")) <= free)
    if task is not None:
        return free, task
    for t in sorted({a for a in arrivals.values() if a > free}):
        task = picker.pick(lambda msg, t=t: arrivals.get(msg, float("inf")) <= t)
        if task is not None:
            return t, task
    return float("inf"), None


def stage_durations(table: dict) -> Duration:
    """A Duration from `{(pp_rank, "F" | "B"): time}` for a whole chunk."""
    return lambda r, task: table[(r, task.op.value)]


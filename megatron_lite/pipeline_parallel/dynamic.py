"""The readiness-driven pipeline schedule of MegatronDPP (`--use-dpp`) as pure policy: which
forward or backward of (micro-batch, chunk) a pipeline rank may run next, given what it has run
and which inputs have arrived. No process groups: the executor (dynamic_executor.py) and the
simulator (simulate.py) drive the same `DynamicState`, so the tests check the policy on CPU.

MegatronDPP (OpenSQZ/MegatronApp, `forward_backward_pipelining_with_interleaving_dpp_*`)
replaces the fixed interleaved 1F1B order (spec §6.2) by a greedy loop: try the first ready
backward, then the first ready forward, again and again, "first" meaning the earliest entry of
a priority list. Both orders here are priority lists taken from a static schedule table:

* breadth-first (MegatronDPP's list, our default): chunk-major, all micro-batches of chunk 0
  before chunk 1, i.e. the table with one group of all M micro-batches (N = M). The last chunk's
  backwards finish early, so its gradient reduction starts early.
* depth-first: the table of `--microbatch-group-size-per-virtual-pipeline-stage` (groups of N,
  default PP, Megatron's default order), which moves a micro-batch through successive chunks
  sooner and so holds fewer activations. Its window (below) is tighter, and with transfer
  latency a greedy start of whatever is ready can delay the task the pipeline waits for: the
  simulation (tests/unit/test_pipeline_dynamic.py) puts it a little behind the static order
  there, where breadth-first stays ahead.

Two rules MegatronDPP does not have keep this safe and exact:

* In-flight window. The forward at position k of the order's table may run only once
  `k < W + 1 + b`, with W the warm-up count of the static schedule with that table (spec §6.2)
  and b the backwards this rank has run. That static schedule obeys the same rule (its forward
  W+i follows backward i-1), so activations held at once never exceed its bound W + 1
  (`schedules.in_flight_bound`; breadth-first therefore holds as many as the static schedule
  with N = M), and no execution can deadlock: in any state, the task that static schedule would
  run first among those not yet run has its input produced and passes the window (the static
  order is a witness), so some rank can always proceed. An unbounded greedy can deadlock:
  breadth-first under a small bound fills the first rank with chunk-0 forwards while the
  backward they wait for needs a chunk-1 forward.
* Micro-batch order per chunk. Forwards and backwards of one chunk run in micro-batch order,
  as in the static schedule. Every parameter belongs to one chunk, so its gradient accumulates
  the micro-batches in the static order and `--use-dpp` reproduces the static gradients bit for
  bit; the last backward of chunk c is always micro-batch M-1, where the data-parallel reduction
  of the chunk starts (spec §6.2). The order costs nothing: the priorities already prefer the
  earlier micro-batch of a chunk, so its messages arrive in micro-batch order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_lite.pipeline_parallel.layout import last_virtual_stage, virtual_stage
from megatron_lite.pipeline_parallel.schedules import (
    ACT,
    GRAD,
    Op,
    check_schedule,
    schedule_table,
    warmup_count,
)

DEPTH_FIRST, BREADTH_FIRST = "depth-first", "breadth-first"
ORDERS = (BREADTH_FIRST, DEPTH_FIRST)


@dataclass(frozen=True)
class Task:
    op: Op  # Op.FORWARD or Op.BACKWARD
    microbatch: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.op.value}{self.microbatch}.{self.chunk}"


@dataclass(frozen=True)
class Message:
    """A tensor one rank sends another: `kind` ACT (activation) or GRAD, and the (micro-batch,
    chunk) of the receiver's task that consumes it. Every message carries this header on the
    wire, since with a dynamic order the two ends of a channel no longer agree on its sequence."""

    kind: str
    microbatch: int
    chunk: int


class DynamicPlan:
    """What does not change during a step on one pipeline rank: priorities, window, links."""

    def __init__(self, pp_size: int, vpp_size: int, num_microbatches: int, pp_rank: int,
                 group_size: int | None = None, order: str = BREADTH_FIRST):
        if order not in ORDERS:
            raise ValueError(f"unknown dynamic pipeline order {order!r} (one of {', '.join(ORDERS)})")
        if not 0 <= pp_rank < pp_size:
            raise ValueError(f"pipeline rank {pp_rank} outside 0..{pp_size - 1}")
        self.pp, self.vpp, self.m, self.rank = pp_size, vpp_size, num_microbatches, pp_rank
        check_schedule(pp_size, vpp_size, num_microbatches, group_size)
        # Breadth-first is MegatronDPP's chunk-major list, the static table with one group of
        # all M micro-batches; it also takes that schedule's window (a tighter one would make
        # it wait on forwards the list puts last). Depth-first follows the table of N.
        n = check_schedule(pp_size, vpp_size, num_microbatches,
                           group_size if order == DEPTH_FIRST else num_microbatches)
        self.group_size, self.order = n, order
        self.warmup = warmup_count(pp_size, vpp_size, num_microbatches, pp_rank, n)
        table = _table(num_microbatches, vpp_size, n)
        self.window_index = self.forward_priority = {key: k for k, key in enumerate(table)}
        # Backward k runs table entry k on the mirrored chunk (spec §6.2).
        self.backward_priority = {(mb, vpp_size - 1 - c): k for k, (mb, c) in enumerate(table)}

    @property
    def total(self) -> int:
        """Computes this rank runs in a step (forwards and backwards)."""
        return 2 * self.m * self.vpp

    def stage(self, chunk: int) -> int:
        return virtual_stage(self.pp, self.rank, chunk)

    def input_of(self, task: Task) -> Message | None:
        """The message `task` consumes (None on the first / last virtual stage)."""
        v = self.stage(task.chunk)
        if task.op is Op.FORWARD:
            return Message(ACT, task.microbatch, task.chunk) if v > 0 else None
        last = last_virtual_stage(self.pp, self.vpp)
        return Message(GRAD, task.microbatch, task.chunk) if v < last else None

    def output_of(self, task: Task) -> tuple[int, Message] | None:
        """(receiving pipeline rank, message) that `task` produces, if any: activations go to
        virtual stage v+1, gradients to v-1 (with chunks, the last rank wraps to the first)."""
        v, last = self.stage(task.chunk), last_virtual_stage(self.pp, self.vpp)
        if task.op is Op.FORWARD and v < last:
            return (self.rank + 1) % self.pp, Message(ACT, task.microbatch, (v + 1) // self.pp)
        if task.op is Op.BACKWARD and v > 0:
            return (self.rank - 1) % self.pp, Message(GRAD, task.microbatch, (v - 1) // self.pp)
        return None

    def expected(self, kind: str) -> int:
        """Messages of `kind` this rank receives in a step."""
        task_op = Op.FORWARD if kind == ACT else Op.BACKWARD
        return sum(self.m for c in range(self.vpp) if self.input_of(Task(task_op, 0, c)) is not None)

    def is_last_backward(self, task: Task) -> bool:
        """Last backward of its chunk in the step (micro-batch order per chunk makes it M-1)."""
        return task.op is Op.BACKWARD and task.microbatch == self.m - 1


def _table(m: int, vpp: int, n: int) -> list[tuple[int, int]]:
    return [(mb, 0) for mb in range(m)] if vpp == 1 else schedule_table(m, vpp, n)


@dataclass
class DynamicState:
    """One rank's progress through a step. `pick` chooses the next task from the inputs that
    have arrived; `complete` records that it ran."""

    plan: DynamicPlan
    next_forward: list = field(default_factory=list)  # per chunk: micro-batch of its next forward
    next_backward: list = field(default_factory=list)
    backwards_done: int = 0
    done: int = 0
    last_op: Op | None = None

    def __post_init__(self):
        self.next_forward = [0] * self.plan.vpp
        self.next_backward = [0] * self.plan.vpp

    @property
    def finished(self) -> bool:
        return self.done == self.plan.total

    @property
    def in_flight(self) -> int:
        """Forwards whose backward has not run (sets of activations held)."""
        return sum(self.next_forward) - self.backwards_done

    def candidates(self) -> tuple[list[Task], list[Task]]:
        """(forwards, backwards) allowed next by the window and the per-chunk order, whatever
        has arrived; at most one of each per chunk."""
        p, forwards, backwards = self.plan, [], []
        for c in range(p.vpp):
            mb = self.next_forward[c]
            if mb < p.m and p.window_index[(mb, c)] < p.warmup + 1 + self.backwards_done:
                forwards.append(Task(Op.FORWARD, mb, c))
            mb = self.next_backward[c]
            if mb < self.next_forward[c]:  # its own forward has run
                backwards.append(Task(Op.BACKWARD, mb, c))
        return forwards, backwards

    def pick(self, arrived: Callable[[Message], bool]) -> Task | None:
        """MegatronDPP's loop body, one task at a time: a ready backward, then a ready forward,
        alternating while both kinds are ready; each kind by priority. None if nothing is ready."""
        p = self.plan
        forwards, backwards = self.candidates()
        ready = lambda t: (m := p.input_of(t)) is None or arrived(m)  # noqa: E731
        forward = min(filter(ready, forwards), key=lambda t: p.forward_priority[(t.microbatch, t.chunk)],
                      default=None)
        backward = min(filter(ready, backwards), key=lambda t: p.backward_priority[(t.microbatch, t.chunk)],
                       default=None)
        if forward is not None and (backward is None or self.last_op is Op.BACKWARD):
            return forward
        return backward

    def complete(self, task: Task) -> None:
        if task.op is Op.FORWARD:
            assert self.next_forward[task.chunk] == task.microbatch, (task, self.next_forward)
            self.next_forward[task.chunk] += 1
        else:
            assert self.next_backward[task.chunk] == task.microbatch, (task, self.next_backward)
            self.next_backward[task.chunk] += 1
            self.backwards_done += 1
        self.done += 1
        self.last_op = task.op

"""Pipeline schedules as data: each rank's ordered list of actions for one training step.

`build(...)` is a pure function of (PP, VPP, M, pp rank, group size, forward-only, overlap).
It returns compute actions (forward / backward of (micro-batch, chunk)) interleaved with the
point-to-point actions they imply, so the executor (executor.py) is a plain interpreter and
the tests can check order, dependencies and memory bounds without any process group:

* `RECV` posts the receive of an input: the activation a forward consumes (kind "act") or
  the output gradient a backward consumes (kind "grad"). The compute that needs it waits for
  it right before running.
* `SEND` posts the send of a forward's output activation / a backward's input gradient.
* `SYNC` waits for every p2p operation this rank has posted (once, at the end of the step).
* `BACKWARD` actions carry `last=True` on the last backward of their chunk in this step,
  where the data-parallel gradient reduction of that chunk may start (spec §6.2).

Orders (spec §6): no pipelining = F0 B0 F1 B1 ... (gradient accumulation); 1F1B (§6.1);
interleaved 1F1B (§6.2) from the schedule table with micro-batch groups of N
(`--microbatch-group-size-per-virtual-pipeline-stage`, default PP = Megatron's depth-first
order, N = M gives breadth-first, the observed trace of §6.3).

Communication placement: a compute's send is posted right after it and never waited before
the end of the step; its receive is posted right before it (no overlap) or before the previous
compute (`overlap_p2p_comm`), so the transfer runs under that compute. No rank ever blocks
except on an input it needs, so any schedule whose inputs are produced before use is deadlock
free, given that each channel (one per direction and kind, see p2p.py) carries its messages in
the same order on both ends; the schedule tests check both, under rendezvous semantics (a send
completes only once its receive is posted). Megatron instead waits on batched send/recv
pairs after each step, which with virtual stages needs PP > 2 or overlap (spec §5.4), a
rule config/validation.py keeps for compatibility. The group-size rules (`check_schedule`)
live here only; validation calls them.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from megatron_lite.pipeline_parallel.layout import check_virtual_pipeline, last_virtual_stage, virtual_stage


class Op(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    RECV = "recv"
    SEND = "send"
    SYNC = "sync"


ACT, GRAD = "act", "grad"


@dataclass(frozen=True)
class Action:
    op: Op
    microbatch: int = -1
    chunk: int = -1
    kind: str | None = None  # RECV / SEND: ACT or GRAD
    peer: int | None = None  # RECV / SEND: pipeline rank at the other end
    last: bool = False  # BACKWARD: last backward of this chunk in the step

    def __str__(self) -> str:
        if self.op in (Op.FORWARD, Op.BACKWARD):
            return f"{self.op.value}{self.microbatch}.{self.chunk}"
        if self.op is Op.SYNC:
            return "sync"
        return f"{self.op.value}-{self.kind}{self.microbatch}.{self.chunk}@{self.peer}"


class ScheduleError(ValueError):
    """An impossible schedule; the message names the flags at fault."""


# ---- the orders of spec §6 --------------------------------------------------------------
def schedule_table(num_microbatches: int, vpp_size: int, group_size: int) -> list[tuple[int, int]]:
    """spec §6.2: `table[k] = (micro-batch, chunk)` of virtual micro-batch k, identical on
    every rank. Micro-batches are cut into groups of N; the last group takes the remainder."""
    table, start = [], 0
    while start < num_microbatches:
        end = num_microbatches if start + group_size >= num_microbatches else start + group_size
        table += [(mb, chunk) for chunk in range(vpp_size) for mb in range(start, end)]
        start = end
    return table


def check_schedule(pp_size: int, vpp_size: int, num_microbatches: int, group_size: int | None) -> int:
    """Validity rules of spec §6.2; returns the effective group size N. The one owner of
    these rules: config/validation.py and dynamic.py call it."""
    m = num_microbatches
    if pp_size < 1 or vpp_size < 1 or m < 1:
        raise ScheduleError(f"bad schedule sizes: PP {pp_size}, VPP {vpp_size}, micro-batches {m}")
    if vpp_size == 1:
        return 1
    flag = "--microbatch-group-size-per-virtual-pipeline-stage"
    try:
        check_virtual_pipeline(pp_size, vpp_size)
    except ValueError as e:
        raise ScheduleError(str(e)) from None
    n = pp_size if group_size is None else group_size
    if not pp_size <= n <= m:
        raise ScheduleError(
            f"the interleaved schedule needs --pipeline-model-parallel-size ({pp_size}) <= {flag} ({n}) "
            f"<= number of micro-batches ({m} = --global-batch-size / (--micro-batch-size x data-parallel "
            "size))")
    if m % n and m % n < pp_size:
        raise ScheduleError(
            f"the number of micro-batches ({m}) mod {flag} ({n}) is {m % n}; it must be 0 or >= "
            f"--pipeline-model-parallel-size ({pp_size}), otherwise the interleaved schedule has "
            "dependency bubbles (with the default group size: M must be a multiple of PP)")
    return n


def warmup_count(pp_size: int, vpp_size: int, num_microbatches: int, pp_rank: int,
                 group_size: int | None = None) -> int:
    """Forwards before the first backward: `min(PP - r - 1, M)` for 1F1B (§6.1),
    `min(2 (PP - r - 1) + (VPP - 1) N, M VPP)` interleaved (§6.2)."""
    if vpp_size == 1:
        return min(pp_size - pp_rank - 1, num_microbatches)
    n = check_schedule(pp_size, vpp_size, num_microbatches, group_size)
    return min(2 * (pp_size - pp_rank - 1) + (vpp_size - 1) * n, num_microbatches * vpp_size)


def in_flight_bound(pp_size: int, vpp_size: int, num_microbatches: int, pp_rank: int,
                    group_size: int | None = None) -> int:
    """Most (micro-batch, chunk) forwards whose backward has not run yet, i.e. sets of
    activations held at once: warm-up + 1, at most all M x VPP."""
    w = warmup_count(pp_size, vpp_size, num_microbatches, pp_rank, group_size)
    return min(w + 1, num_microbatches * vpp_size)


def compute_order(pp_size: int, vpp_size: int, num_microbatches: int, pp_rank: int,
                  group_size: int | None = None, forward_only: bool = False) -> list[tuple[Op, int, int]]:
    """The (op, micro-batch, chunk) sequence of one rank, without communication."""
    vpp = vpp_size
    n = check_schedule(pp_size, vpp, num_microbatches, group_size)
    if vpp == 1:
        table = [(mb, 0) for mb in range(num_microbatches)]
    else:
        table = schedule_table(num_microbatches, vpp, n)
    fwd = [(Op.FORWARD, mb, c) for mb, c in table]
    if forward_only:
        return fwd
    bwd = [(Op.BACKWARD, mb, vpp - 1 - c) for mb, c in table]  # backward walks chunks in reverse
    total = len(table)
    w = warmup_count(pp_size, vpp, num_microbatches, pp_rank, n)
    order = fwd[:w]
    for i in range(total - w):  # steady 1F1B: forward W+i, then backward i
        order += [fwd[w + i], bwd[i]]
    return order + bwd[total - w:]


def in_flight_per_chunk(schedule, vpp_size: int) -> list[int]:
    """Per model chunk, the most micro-batches whose forward has run and backward has not at
    any point of `schedule` (one rank's actions), at least 1: how many copies of a chunk's
    CUDA graphs a step needs (models/cuda_graphs.py)."""
    held, most = [0] * vpp_size, [1] * vpp_size
    for a in schedule:
        if a.op is Op.FORWARD:
            held[a.chunk] += 1
            most[a.chunk] = max(most[a.chunk], held[a.chunk])
        elif a.op is Op.BACKWARD:
            held[a.chunk] -= 1
    return most


# ---- communication implied by the order -------------------------------------------------
def _input_of(op: Op, mb: int, chunk: int, pp: int, vpp: int, rank: int) -> Action | None:
    stage, last = virtual_stage(pp, rank, chunk), last_virtual_stage(pp, vpp)
    if op is Op.FORWARD and stage > 0:  # activation from virtual stage v - 1
        return Action(Op.RECV, mb, chunk, ACT, (rank - 1) % pp)
    if op is Op.BACKWARD and stage < last:  # output gradient from virtual stage v + 1
        return Action(Op.RECV, mb, chunk, GRAD, (rank + 1) % pp)
    return None


def _output_of(op: Op, mb: int, chunk: int, pp: int, vpp: int, rank: int) -> Action | None:
    stage, last = virtual_stage(pp, rank, chunk), last_virtual_stage(pp, vpp)
    if op is Op.FORWARD and stage < last:
        return Action(Op.SEND, mb, chunk, ACT, (rank + 1) % pp)
    if op is Op.BACKWARD and stage > 0:
        return Action(Op.SEND, mb, chunk, GRAD, (rank - 1) % pp)
    return None


def build(pp_size: int, vpp_size: int, num_microbatches: int, pp_rank: int, *,
          group_size: int | None = None, forward_only: bool = False,
          overlap_p2p_comm: bool = False) -> list[Action]:
    """This rank's actions for one step (see the module docstring)."""
    if not 0 <= pp_rank < pp_size:
        raise ScheduleError(f"pipeline rank {pp_rank} outside 0..{pp_size - 1}")
    vpp = vpp_size or 1
    order = compute_order(pp_size, vpp, num_microbatches, pp_rank, group_size, forward_only)
    last_bwd = {}
    for i, (op, _, chunk) in enumerate(order):
        if op is Op.BACKWARD:
            last_bwd[chunk] = i
    computes = [Action(op, mb, c, last=(op is Op.BACKWARD and last_bwd[c] == i))
                for i, (op, mb, c) in enumerate(order)]
    inputs = [_input_of(op, mb, c, pp_size, vpp, pp_rank) for op, mb, c in order]
    outputs = [_output_of(op, mb, c, pp_size, vpp, pp_rank) for op, mb, c in order]
    actions: list[Action] = []
    if overlap_p2p_comm and inputs and inputs[0]:
        actions.append(inputs[0])
    for i, compute in enumerate(computes):
        # With overlap the receive of the next compute is posted first, so it runs under this
        # one; without, a compute posts its own receive and waits for it at once.
        recv = inputs[i + 1] if overlap_p2p_comm and i + 1 < len(inputs) else (
            None if overlap_p2p_comm else inputs[i])
        actions += [a for a in (recv, compute, outputs[i]) if a]
    return actions + ([Action(Op.SYNC)] if any(outputs) else [])


def build_all(pp_size: int, vpp_size: int, num_microbatches: int, **kwargs) -> list[list[Action]]:
    """Every pipeline rank's actions (for tests, traces and simulation)."""
    return [build(pp_size, vpp_size, num_microbatches, r, **kwargs) for r in range(pp_size)]

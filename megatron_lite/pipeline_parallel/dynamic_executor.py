"""One training step in MegatronDPP's readiness-driven order (`--use-dpp`): the policy of
dynamic.py driven by real arrivals on the p2p channels (p2p.py), the computes done by the
PipelineExecutor (executor.py).

Messages. With a dynamic order the two ends of a channel no longer agree on which
(micro-batch, chunk) its next message carries, so each payload is announced by a header, an
int64 pair (micro-batch, chunk of the receiving task) sent on the host over the channel's gloo
twin (`PipelineChannels.isend_header`). MegatronDPP drives its transfers from the host too,
through its own shared-memory / RDMA library; here NCCL or gloo moves the payloads.

Why the header is on the host: on CUDA no NCCL kernel is launched before its peer is ready.
A pending NCCL receive is a kernel spinning on its stream, and what is queued behind it (on
that stream, or on a hardware queue the stream shares) waits too. Two earlier versions hung
on 2xH200 that way: one kept a header receive and a payload receive posted two deep on each
channel long before the sender had computed anything, and with CUDA_DEVICE_MAX_CONNECTIONS=1
(one hardware queue for all streams) the compute the peer waited for sat behind them; one
(header packed into the payload, one receive in flight per channel) still posted receives
ahead, and hung even with the default connections (cause not established; more streams than
hardware queues is one way for a pending receive to hold up another stream). Both had
kernels waiting for a peer that was not ready. Now:

* Sender (`Outbox`, dynamic_channels.py): a computed output is queued with a CUDA event
  recorded after it, to the channel's sender thread. In order, that thread waits for the event
  on the host, then for the channel's previous send to complete; only then does the header go
  out on gloo and, right after it, the NCCL send, from an idle side stream. So a send is
  launched with its data ready, at most one per channel in flight, and the channel order is
  the order of headers.
* Receiver (`Inbox`): the channel's receiver thread takes the headers in order and, right
  after each, posts its NCCL receive from the side stream; it waits for that receive to
  complete before posting the next (one in flight per channel: the sender keeps that order).
  The main loop sees the posted receives without blocking, and a task is ready when its
  receive `is_completed()`; `take()` orders the compute stream after it.

Why threads: the main thread launches a compute's kernels from Python (ms of host time) and
only comes back between tasks; a send whose data was ready, or a header that had arrived,
would wait for it at every pipeline hop, and the GPU, no longer fed ahead, would idle. The
threads wait without the GIL (gloo's wait, event synchronize, sleeps between polls of an NCCL
work), and during a step the GIL switch interval is lowered so that a woken thread gets the
GIL back within 0.1 ms instead of 5 ms (`_DynamicStep.run`). Each channel is one process group
used by one thread on each end. What a thread raises is raised on the main thread by the next
`pump`/`poll`.

A receive is thus launched only after its send (the thread launches the send right after the
header, with nothing in between), so it waits only for a kernel already queued on the peer,
behind work the peer queued even earlier; following such waits leads back in host time and
ends. A send, as far as we know NCCL, completes without its receiver's kernel while the
message fits NCCL's p2p buffers. Not ruled out by construction: a send too large for them
waits for its receive kernel, and if two neighbours each launch such a send before the
other's receive is posted, with one hardware queue each receive queues behind the rank's own
waiting send. tests/gpu/test_cuda_pipeline_dynamic.py probes exactly that case (passes on 2×H200).

On gloo (CPU) the same threads run on the same links, headers set apart by their tag; gloo's
works complete only through `wait()`, so the receiver thread waits for each payload and raises
a flag the main loop polls in place of `is_completed()`; computes are synchronous, so no
events. When nothing is ready the main loop yields the CPU (a short spin, then sleeps growing
to 0.2 ms), never busy-waiting for long.

GPU queue depth (`--dpp-gpu-queue-depth D`, 0 = no limit). A pick is made on the host, but
the GPU runs the launched computes in launch order; a host that runs ahead (fast, or CUDA
graphs) may queue many ready forwards, and a backward picked first once its gradient arrives
then still waits behind them, as does the peer waiting for that backward's output. With
D > 0 the main loop picks only once at most D of its launched computes are unfinished (CUDA
events), so the pick sees what arrived meanwhile; with D = 1 the next compute is launched
while the previous one runs, which hides its launch. On CPU computes are synchronous and the
limit never binds. Measured on 2xH200 (README), it did not recover what breadth-first loses
on fast hosts (the static schedule in breadth-first's order loses as much) and mostly cost
time; it helped depth-first only with an uneven, graphed pipeline, hence off by default.

Lock-step. The TP (and CP) ranks of a stage run collectives inside every forward and backward,
so they must pick the same task. They receive the same messages in the same order (their
senders are in lock-step too), so agreeing on how many payloads of each channel have completed
everywhere (an all-reduce MIN on a gloo twin of the tp-cp group, host-side: an NCCL result
would wait for the queued compute) gives them the same ready set and the same pick.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_lite.pipeline_parallel.dynamic import DynamicPlan, DynamicState, Task
from megatron_lite.pipeline_parallel.dynamic_channels import Inbox, Outbox
from megatron_lite.pipeline_parallel.schedules import ACT, GRAD, Action, Op

# Waiting for an input: polls that only yield the CPU (a few ms), then sleeps growing by 5 us
# per poll up to 0.2 ms, which bounds how late a long-awaited arrival is noticed.
_SPIN_POLLS = 200
_SLEEP_STEP_S, _MAX_SLEEP_S = 5e-6, 2e-4
# GIL switch interval during a dynamic step (Python's default is 5 ms), see _DynamicStep.run.
_SWITCH_INTERVAL_S = 1e-4


class LaunchQueue:
    """This rank's launched computes not yet finished on its GPU, as events recorded after
    each; `full()` while more than `depth` of them are unfinished. `depth` 0, or a CPU device,
    keeps no events and is never full. `make_event`: a factory of objects with record() and
    query()."""

    def __init__(self, depth: int, device: torch.device, make_event: Callable | None = None):
        self.depth = depth if device.type == "cuda" or make_event is not None else 0
        self.make_event = make_event or torch.cuda.Event
        self.pending: deque = deque()

    def launched(self) -> None:
        if self.depth:
            event = self.make_event()
            event.record()  # on the current stream, after the compute's kernels
            self.pending.append(event)

    def full(self) -> bool:
        while self.pending and self.pending[0].query():
            self.pending.popleft()
        return len(self.pending) > self.depth > 0


class _DynamicStep:
    def __init__(self, executor, st, hooks):
        ex, ps = executor, executor.ps
        self.ex, self.st, self.hooks = ex, st, hooks
        cfg = ex.config
        self.plan = DynamicPlan(ps.pp_size, ex.vpp_size, st.num_microbatches, ps.pp_rank,
                                cfg.microbatch_group_size, cfg.dynamic_order)
        self.state = DynamicState(self.plan)
        self.launches = LaunchQueue(cfg.dynamic_queue_depth, ex._device)
        # One side stream for every receive and send: only completed events are waited on it.
        self.stream = torch.cuda.Stream(ex._device) if ex._device.type == "cuda" else None
        shape = ex._activation_shape(st, 0)  # every micro-batch has the same shape
        self.inboxes: dict[str, Inbox] = {}
        for kind, peer in ((ACT, (ps.pp_rank - 1) % ps.pp_size), (GRAD, (ps.pp_rank + 1) % ps.pp_size)):
            if self.plan.expected(kind):
                self.inboxes[kind] = Inbox(ex.channels, kind, peer, self.plan.expected(kind), shape,
                                            ex._dtype, ex._device, self.stream)
        self.outboxes: dict[str, Outbox] = {}  # created on a kind's first send
        self.lockstep = ps.cpu_groups.get("tp-cp") if ps.tp_size * ps.cp_size > 1 else None
        self.timeout_s = ps.timeout.total_seconds() if ps.timeout else 600.0  # Megatron: 10 minutes

    def run(self) -> None:
        # The helper threads (dynamic_channels.py) wait without the GIL, but need it back to
        # send the next header or post a receive; meanwhile the main thread launches kernels
        # from Python and keeps the GIL until the switch interval forces it to hand over: up
        # to 5 ms by default, added to every pipeline hop. 0.1 ms bounds that wait; the cost
        # is a few more GIL hand-overs while a helper is runnable (they mostly sleep).
        switch, finished = sys.getswitchinterval(), False
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        try:
            while not self.state.finished:
                self._execute(self._next_task())
            self._drain()
            finished = True
        finally:
            sys.setswitchinterval(switch)  # first: a failed close must not leave it lowered
            for box in [*self.inboxes.values(), *self.outboxes.values()]:
                box.close(finished)

    def _next_task(self) -> Task:
        polls = 0
        while self.launches.full():  # local: the lock-step agreement below stays one per poll
            self._pump()
            polls += 1
            _idle(polls)
        polls, since = 0, time.monotonic()
        while True:
            self._pump()
            local = [inbox.poll() for inbox in self.inboxes.values()]
            agreed = self._agree(local)
            task = self.state.pick(self._known(agreed))
            if task is not None:
                return task
            if agreed != local:
                continue  # a lock-step peer is behind; agreeing again blocks until it catches up
            if time.monotonic() - since > self.timeout_s:
                raise RuntimeError(self._stuck(local))
            polls += 1
            _idle(polls)

    def _pump(self) -> bool:
        """Raise what an outbox thread raised; True once all sends have completed."""
        return all([box.pump() for box in self.outboxes.values()])  # a list: pump every one

    def _drain(self) -> None:
        """Wait until the outbox threads have sent this rank's last messages (the receivers'
        inbox threads post the matching receives), with the same timeout as for an input."""
        polls, since = 0, time.monotonic()
        while not self._pump():
            if time.monotonic() - since > self.timeout_s:
                raise RuntimeError(f"--use-dpp: pipeline rank {self.plan.rank}: its last sends did not "
                                   f"complete in {self.timeout_s:.0f} s (--distributed-timeout-minutes)")
            polls += 1
            _idle(polls)

    def _stuck(self, arrived: list[int]) -> str:
        # A peer that died or hangs. The backends time out a pending receive as well (NCCL's
        # watchdog, gloo's wait), but their message names no task; this one says what the rank
        # could run and what has been announced and has arrived.
        forwards, backwards = self.state.candidates()
        waiting = ", ".join(str(t) for t in forwards + backwards) or "nothing (window full)"
        got = ", ".join(f"{k} {n}/{i.expected} ({i.announced} announced)"
                        for (k, i), n in zip(self.inboxes.items(), arrived))
        return (f"--use-dpp: pipeline rank {self.plan.rank} got no input for {self.timeout_s:.0f} s "
                f"(--distributed-timeout-minutes); it can run {waiting}; messages arrived: {got}")

    def _known(self, agreed: list[int]):
        """Whether a message is among the first `agreed` of its channel (arrived everywhere)."""
        limit = dict(zip(self.inboxes, agreed))
        return lambda msg: self.inboxes[msg.kind].known(msg, limit[msg.kind])

    def _agree(self, counts: list[int]) -> list[int]:
        """Payloads per channel that have completed on every rank of the lock-step group."""
        if self.lockstep is None or not counts:
            return counts
        t = torch.tensor(counts, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.lockstep)
        return t.tolist()

    def _execute(self, task: Task) -> None:
        msg = self.plan.input_of(task)
        received = None if msg is None else self.inboxes[msg.kind].take(msg)
        action = Action(task.op, task.microbatch, task.chunk, last=self.plan.is_last_backward(task))
        self.ex._compute(action, self.st, self.hooks, received)
        self.launches.launched()
        self.state.complete(task)
        out = self.plan.output_of(task)
        if out is None:
            return
        peer, sent = out
        payload = self.ex._outgoing(Action(Op.SEND, task.microbatch, task.chunk, sent.kind, peer), self.st)
        if sent.kind not in self.outboxes:
            self.outboxes[sent.kind] = Outbox(self.ex.channels, sent.kind, peer, self.stream)
        self.outboxes[sent.kind].put(sent, payload)


def _idle(polls: int) -> None:
    """Yield the CPU while waiting: a few ms of bare yields, then sleeps growing to 0.2 ms."""
    over = polls - _SPIN_POLLS
    time.sleep(0 if over < 0 else min(_MAX_SLEEP_S, _SLEEP_STEP_S * (over + 1)))


def run_dynamic_step(executor, st, hooks) -> None:
    """Every forward and backward of this rank for one training step, in readiness order."""
    _DynamicStep(executor, st, hooks).run()

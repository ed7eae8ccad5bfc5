"""One training step in MegatronDPP's readiness-driven order (`--use-dpp`): the policy of
dynamic.py driven by real arrivals on the p2p channels (p2p.py), the computes and sends done by
the PipelineExecutor (executor.py).

Messages. With a dynamic order the two ends of a channel no longer agree on which
(micro-batch, chunk) its next message carries, so each payload is preceded, on the same FIFO
channel, by a header: an int64 pair (micro-batch, chunk of the receiving task). The receiver
keeps the next receives of each incoming channel posted (header and payload, `_Inbox`) and
learns what arrived when they complete. MegatronDPP moves tensors through its own
shared-memory / RDMA library instead; over NCCL or gloo the channels do that job.

Readiness. A task is ready when its input has arrived, not merely been announced: on CUDA
`Work.is_completed()` of header and payload, then an event after the header's copy to the
host, all polled without touching the compute stream; gloo's send/recv works cannot be polled,
so on CPU a waiter thread per channel waits for them in order. When nothing is ready the loop
yields the CPU (a short spin, then sleeps growing to 0.2 ms), never busy-waiting for long.

Lock-step. The TP (and CP) ranks of a stage run collectives inside every forward and backward,
so they must pick the same task. They receive the same messages in the same order (their
senders are in lock-step too), so agreeing on how many messages of each channel have arrived
everywhere (an all-reduce MIN on a gloo twin of the tp-cp group, host-side: an NCCL result
would wait for the queued compute) gives them the same ready set and the same pick.

Receives are posted from a side stream per channel: NCCL makes a new operation wait for the
work queued on the current stream, and a receive should land while the stage computes.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.pipeline_parallel.dynamic import DynamicPlan, DynamicState, Message, Task
from megatron_lite.pipeline_parallel.schedules import ACT, GRAD, Action, Op

# Receives kept posted ahead per incoming channel: one can transfer while another completes.
_RECEIVE_DEPTH = 2
# Waiting for an input: polls that only yield the CPU (a few ms), then sleeps growing by 5 us
# per poll up to 0.2 ms, which bounds how late a long-awaited arrival is noticed.
_SPIN_POLLS = 200
_SLEEP_STEP_S, _MAX_SLEEP_S = 5e-6, 2e-4


@dataclass
class _Posted:
    header: torch.Tensor  # [2] int64: micro-batch, chunk of the receiving task
    header_work: object
    payload: torch.Tensor  # [s/cp(/tp), b, h]
    payload_work: object
    host_header: torch.Tensor | None = None  # CUDA: pinned copy of the header
    copied: torch.cuda.Event | None = None  # CUDA: recorded after that copy
    done: threading.Event | None = None  # gloo: set by the waiter thread


class _Inbox:
    """The receiving end of one incoming channel (kind ACT or GRAD) for one step."""

    def __init__(self, channels, kind: str, peer: int, expected: int, shape, dtype, device):
        self.channels, self.kind, self.peer, self.expected = channels, kind, peer, expected
        self.shape, self.dtype, self.device = shape, dtype, device
        self.cuda = device.type == "cuda"
        self.posted: deque[_Posted] = deque()
        self.num_posted = 0
        self.position: dict[Message, int] = {}  # arrival order on this channel
        self.payloads: dict[Message, tuple] = {}  # arrived and not yet consumed
        self.error: BaseException | None = None
        if self.cuda:
            self.post_stream, self.copy_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)
        else:
            self._waits: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._wait_in_order, daemon=True,
                                            name=f"dpp-{kind}-inbox")
            self._thread.start()

    @property
    def arrived(self) -> int:
        return len(self.position)

    def poll(self) -> int:
        """Record every completed receive (in channel order), post the next ones; returns the
        number of messages arrived so far."""
        if self.error is not None:
            raise RuntimeError(f"receiving {self.kind} from pipeline rank {self.peer} failed") from self.error
        while self.posted and self._complete(self.posted[0]):
            p = self.posted.popleft()
            mb, chunk = (p.host_header if self.cuda else p.header).tolist()
            msg = Message(self.kind, mb, chunk)
            self.position[msg] = len(self.position)
            self.payloads[msg] = (p.payload, p.payload_work)
        while len(self.posted) < _RECEIVE_DEPTH and self.num_posted < self.expected:
            self.posted.append(self._post())
            self.num_posted += 1
        return self.arrived

    def known(self, msg: Message, agreed: int) -> bool:
        """Arrived among the first `agreed` messages of the channel."""
        return self.position.get(msg, agreed) < agreed

    def take(self, msg: Message) -> torch.Tensor:
        """The payload of an arrived message, ordered before the compute stream's next work."""
        payload, work = self.payloads.pop(msg)
        if self.cuda:
            work.wait()  # completed already: only orders the compute stream after the receive
            payload.record_stream(torch.cuda.current_stream(self.device))
        return payload

    def close(self, finished: bool) -> None:
        """End of the step. After a failure the waiter thread may be stuck in a receive that
        will never come: it is a daemon and is left behind rather than joined."""
        if finished:
            assert not self.posted and not self.payloads, (self.kind, len(self.posted), list(self.payloads))
        if not self.cuda:
            self._waits.put(None)
            if finished:
                self._thread.join()

    # ---- receiving ------------------------------------------------------------------------
    def _post(self) -> _Posted:
        if not self.cuda:
            header = torch.empty(2, dtype=torch.int64)
            payload = torch.empty(self.shape, dtype=self.dtype)
            p = _Posted(header, self.channels.irecv(header, self.kind, self.peer), payload,
                        self.channels.irecv(payload, self.kind, self.peer), done=threading.Event())
            self._waits.put(p)
            return p
        with torch.cuda.stream(self.post_stream):  # nothing queued here for the receive to wait for
            header = torch.empty(2, dtype=torch.int64, device=self.device)
            payload = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            header_work = self.channels.irecv(header, self.kind, self.peer)
            payload_work = self.channels.irecv(payload, self.kind, self.peer)
        return _Posted(header, header_work, payload, payload_work,
                       host_header=torch.empty(2, dtype=torch.int64, pin_memory=True))

    def _complete(self, p: _Posted) -> bool:
        if not self.cuda:
            return p.done.is_set()
        if p.copied is None:
            # Copy the header to the host only once it has arrived: a stream told to wait for
            # a receive still pending would, with CUDA_DEVICE_MAX_CONNECTIONS=1 (one hardware
            # queue for all streams), hold up the compute queued behind it.
            if not p.header_work.is_completed():
                return False
            with torch.cuda.stream(self.copy_stream):
                p.header_work.wait()
                p.host_header.copy_(p.header, non_blocking=True)
                p.copied = torch.cuda.Event()
                p.copied.record()
        return p.copied.query() and p.payload_work.is_completed()

    def _wait_in_order(self) -> None:
        # gloo works complete only through wait(); the channel is FIFO, so waiting in posting
        # order never waits behind a message that arrives later.
        while (p := self._waits.get()) is not None:
            try:
                p.header_work.wait()
                p.payload_work.wait()
            except BaseException as e:  # noqa: BLE001 - re-raised by poll() on the main thread
                self.error = e
                return
            p.done.set()


class _DynamicStep:
    def __init__(self, executor, st, hooks):
        ex, ps = executor, executor.ps
        self.ex, self.st, self.hooks = ex, st, hooks
        cfg = ex.config
        self.plan = DynamicPlan(ps.pp_size, ex.vpp_size, st.num_microbatches, ps.pp_rank,
                                cfg.microbatch_group_size, cfg.dynamic_order)
        self.state = DynamicState(self.plan)
        shape = ex._activation_shape(st, 0)  # every micro-batch has the same shape
        self.inboxes: dict[str, _Inbox] = {}
        for kind, peer in ((ACT, (ps.pp_rank - 1) % ps.pp_size), (GRAD, (ps.pp_rank + 1) % ps.pp_size)):
            if self.plan.expected(kind):
                self.inboxes[kind] = _Inbox(ex.channels, kind, peer, self.plan.expected(kind), shape,
                                            ex._dtype, ex._device)
        # Row mb * VPP + chunk: the header of the message for the receiver's task (mb, chunk).
        vpp, m = ex.vpp_size, st.num_microbatches
        # From pinned memory without blocking: a pageable copy would wait for the queued compute.
        headers = torch.tensor([[mb, c] for mb in range(m) for c in range(vpp)], dtype=torch.int64)
        self.headers = (headers.pin_memory() if ex._device.type == "cuda" else headers).to(
            ex._device, non_blocking=True)
        self.lockstep = ps.cpu_groups.get("tp-cp") if ps.tp_size * ps.cp_size > 1 else None
        self.timeout_s = ps.timeout.total_seconds() if ps.timeout else 600.0  # Megatron: 10 minutes

    def run(self) -> None:
        finished = False
        try:
            while not self.state.finished:
                self._execute(self._next_task())
            for work, _ in self.st.sends:
                work.wait()
            self.st.sends.clear()
            finished = True
        finally:
            for inbox in self.inboxes.values():
                inbox.close(finished)

    def _next_task(self) -> Task:
        polls, since = 0, time.monotonic()
        while True:
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
            over = polls - _SPIN_POLLS
            time.sleep(0 if over < 0 else min(_MAX_SLEEP_S, _SLEEP_STEP_S * (over + 1)))

    def _stuck(self, arrived: list[int]) -> str:
        # A peer that died or hangs. The backends time out the pending receive as well (NCCL's
        # watchdog, gloo's wait), but their message names no task; this one says what the rank
        # could run and what has arrived.
        forwards, backwards = self.state.candidates()
        waiting = ", ".join(str(t) for t in forwards + backwards) or "nothing (window full)"
        got = ", ".join(f"{k} {n}/{i.expected}" for (k, i), n in zip(self.inboxes.items(), arrived))
        return (f"--use-dpp: pipeline rank {self.plan.rank} got no input for {self.timeout_s:.0f} s "
                f"(--distributed-timeout-minutes); it can run {waiting}; messages arrived: {got}")

    def _known(self, agreed: list[int]):
        """Whether a message is among the first `agreed` of its channel (arrived everywhere)."""
        limit = dict(zip(self.inboxes, agreed))
        return lambda msg: self.inboxes[msg.kind].known(msg, limit[msg.kind])

    def _agree(self, counts: list[int]) -> list[int]:
        """Messages per channel that have arrived on every rank of the lock-step group."""
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
        self.state.complete(task)
        out = self.plan.output_of(task)
        if out is None:
            return
        peer, sent = out
        header = self.headers[sent.microbatch * self.ex.vpp_size + sent.chunk]
        self.st.sends.append((self.ex.channels.isend(header, sent.kind, peer), header))
        self.ex._post_send(Action(Op.SEND, task.microbatch, task.chunk, sent.kind, peer), self.st)


def run_dynamic_step(executor, st, hooks) -> None:
    """Every forward and backward of this rank for one training step, in readiness order."""
    _DynamicStep(executor, st, hooks).run()

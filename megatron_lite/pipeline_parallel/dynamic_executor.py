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

* Sender (`_Outbox`): a computed output is kept with a CUDA event recorded after it. The
  message is announced only once that event has completed (polled on the host) and the
  previous send of the channel has completed: then the header goes out on gloo and, right
  after it, the NCCL send, from an idle side stream. So a send is launched with its data
  ready, at most one per channel in flight, and the channel order is the order of headers.
* Receiver (`_Inbox`): a thread receives the channel's headers in order (`_HeaderReader`);
  the main loop, seeing a new one, posts the NCCL receive for it from the side stream (one in
  flight per channel: the sender keeps that order), and the task is ready when that receive
  `is_completed()`.

A receive is thus launched only after its send (the host launches the send right after the
header, with nothing in between), so it waits only for a kernel already queued on the peer,
behind work the peer queued even earlier; following such waits leads back in host time and
ends. A send, as far as we know NCCL, completes without its receiver's kernel while the
message fits NCCL's p2p buffers. Not ruled out by construction: a send too large for them
waits for its receive kernel, and if two neighbours each launch such a send before seeing the
other's header, with one hardware queue each receive queues behind the rank's own waiting
send. tests/gpu/test_cuda_pipeline_dynamic.py probes exactly that case (passes on 2×H200).

On gloo (CPU) the same algorithm runs on the same links, headers set apart by their tag.
gloo's works cannot be polled, so threads wait for them in posting order (`_Waiter`; a channel
is FIFO, so this never waits behind a later message) and raise flags the loop polls in place
of `is_completed()`; computes are synchronous, so no events. When nothing is ready the loop
yields the CPU (a short spin, then sleeps growing to 0.2 ms), never busy-waiting for long.

Lock-step. The TP (and CP) ranks of a stage run collectives inside every forward and backward,
so they must pick the same task. They receive the same messages in the same order (their
senders are in lock-step too), so agreeing on how many payloads of each channel have completed
everywhere (an all-reduce MIN on a gloo twin of the tp-cp group, host-side: an NCCL result
would wait for the queued compute) gives them the same ready set and the same pick.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

from megatron_lite.pipeline_parallel.dynamic import DynamicPlan, DynamicState, Message, Task
from megatron_lite.pipeline_parallel.schedules import ACT, GRAD, Action, Op

# Waiting for an input: polls that only yield the CPU (a few ms), then sleeps growing by 5 us
# per poll up to 0.2 ms, which bounds how late a long-awaited arrival is noticed.
_SPIN_POLLS = 200
_SLEEP_STEP_S, _MAX_SLEEP_S = 5e-6, 2e-4


class _Waiter:
    """A thread that waits for gloo works in posting order and flags each done (gloo works
    complete only through wait(); NCCL ones are polled with is_completed() instead)."""

    def __init__(self, name: str):
        self.error: BaseException | None = None
        self._works: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def watch(self, work):
        """A no-argument callable that is True once `work` has completed."""
        done = threading.Event()
        self._works.put((work, done))
        return done.is_set

    def close(self, join: bool) -> None:
        # After a failure the thread may be stuck in a work that will never complete: it is a
        # daemon and is left behind rather than joined.
        self._works.put(None)
        if join:
            self._thread.join()

    def _run(self) -> None:
        while (item := self._works.get()) is not None:
            work, done = item
            try:
                work.wait()
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self.error = e
                return
            done.set()


class _HeaderReader:
    """A thread that receives the `expected` headers of one incoming channel, in order, on the
    host; the main loop collects them with `new()` without blocking."""

    def __init__(self, channels, kind: str, peer: int, expected: int):
        self.channels, self.kind, self.peer, self.expected = channels, kind, peer, expected
        self.error: BaseException | None = None
        self._headers: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"dpp-{kind}-headers")
        self._thread.start()

    def new(self) -> list[Message]:
        out = []
        while True:
            try:
                out.append(self._headers.get_nowait())
            except queue.Empty:
                return out

    def close(self, join: bool) -> None:
        if join:  # else possibly stuck in a receive that will never come (see _Waiter.close)
            self._thread.join()

    def _run(self) -> None:
        for _ in range(self.expected):
            header = torch.empty(2, dtype=torch.int64)  # micro-batch, chunk of the receiving task
            try:
                self.channels.irecv_header(header, self.kind, self.peer).wait()
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self.error = e
                return
            mb, chunk = header.tolist()
            self._headers.put(Message(self.kind, mb, chunk))


class _Inbox:
    """The receiving end of one incoming channel (kind ACT or GRAD) for one step: announced
    messages wait in `announced`, one payload receive is in flight (`arriving`), completed
    payloads wait in `payloads` until their task takes them."""

    def __init__(self, channels, kind: str, peer: int, expected: int, shape, dtype, device, stream):
        self.channels, self.kind, self.peer, self.expected = channels, kind, peer, expected
        self.shape, self.dtype, self.device, self.stream = shape, dtype, device, stream
        self.reader = _HeaderReader(channels, kind, peer, expected)
        self.waiter = None if stream is not None else _Waiter(f"dpp-{kind}-inbox")
        self.announced: deque[Message] = deque()
        self.arriving: tuple | None = None  # (message, buffer, work, completed())
        self.position: dict[Message, int] = {}  # completion order on this channel
        self.payloads: dict[Message, tuple] = {}  # completed and not yet taken: (buffer, work)

    @property
    def arrived(self) -> int:
        return len(self.position)

    def poll(self) -> int:
        """Collect new headers, record a completed payload, post the next receive; returns the
        number of payloads completed so far."""
        for error in (self.reader.error, self.waiter and self.waiter.error):
            if error is not None:
                raise RuntimeError(f"receiving {self.kind} from pipeline rank {self.peer} failed") from error
        self.announced.extend(self.reader.new())
        if self.arriving is not None and self.arriving[3]():
            msg, buf, work, _ = self.arriving
            self.position[msg] = len(self.position)
            self.payloads[msg] = (buf, work)
            self.arriving = None
        if self.arriving is None and self.announced:
            self.arriving = self._post(self.announced.popleft())
        return self.arrived

    def known(self, msg: Message, agreed: int) -> bool:
        """Completed among the first `agreed` messages of the channel."""
        return self.position.get(msg, agreed) < agreed

    def take(self, msg: Message) -> torch.Tensor:
        """The payload of a completed message, ordered before the compute stream's next work."""
        payload, work = self.payloads.pop(msg)
        if self.stream is not None:
            work.wait()  # completed already: only orders the compute stream after the receive
            payload.record_stream(torch.cuda.current_stream(self.device))
        return payload

    def close(self, finished: bool) -> None:
        if finished:
            assert not self.announced and self.arriving is None and not self.payloads, \
                (self.kind, list(self.announced), list(self.payloads))
        self.reader.close(join=finished)
        if self.waiter is not None:
            self.waiter.close(join=finished)

    def _post(self, msg: Message) -> tuple:
        if self.stream is None:
            buf = torch.empty(self.shape, dtype=self.dtype)
            work = self.channels.irecv(buf, self.kind, self.peer)
            return msg, buf, work, self.waiter.watch(work)
        # From the side stream, where nothing is queued: NCCL makes an operation wait for the
        # work queued on the current stream, and the payload should land while the stage
        # computes. Allocated there too, so the buffer is not one the compute stream still uses.
        with torch.cuda.stream(self.stream):
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            work = self.channels.irecv(buf, self.kind, self.peer)
        return msg, buf, work, work.is_completed


class _Outbox:
    """The sending end of one outgoing channel: messages leave in order, each announced by its
    header once its data is ready and the previous send has completed."""

    def __init__(self, channels, kind: str, peer: int, stream):
        self.channels, self.kind, self.peer, self.stream = channels, kind, peer, stream
        self.waiter = _Waiter(f"dpp-{kind}-outbox")  # gloo works: the headers (and CPU payloads)
        self.queued: deque = deque()  # (message, payload, CUDA event after its compute or None)
        self.in_flight: tuple | None = None  # (completion checks, header, payload) kept alive

    def put(self, msg: Message, payload: torch.Tensor) -> None:
        """Queue `payload`, just computed on the current stream, for the receiver's `msg`."""
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self.queued.append((msg, payload, ready))
        self.pump()

    def pump(self) -> bool:
        """Announce and send the next message if it may go; True once everything has been sent."""
        if (error := self.waiter.error) is not None:
            raise RuntimeError(f"sending {self.kind} to pipeline rank {self.peer} failed") from error
        if self.in_flight is not None:
            if not all(done() for done in self.in_flight[0]):
                return False
            self.in_flight = None
        if not self.queued:
            return True
        msg, payload, ready = self.queued[0]
        if ready is not None and not ready.query():
            return False  # not computed yet: no kernel is launched before its data is there
        self.queued.popleft()
        header = torch.tensor([msg.microbatch, msg.chunk], dtype=torch.int64)
        checks = [self.waiter.watch(self.channels.isend_header(header, self.kind, self.peer))]
        if self.stream is None:
            checks.append(self.waiter.watch(self.channels.isend(payload, self.kind, self.peer)))
        else:
            # From the idle side stream: from the compute stream the send would also wait for
            # every compute queued since. The event has completed; waiting on it only states
            # the dependency to the stream.
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                checks.append(self.channels.isend(payload, self.kind, self.peer).is_completed)
        self.in_flight = (checks, header, payload)
        return False

    def close(self, finished: bool) -> None:
        self.waiter.close(join=finished)


class _DynamicStep:
    def __init__(self, executor, st, hooks):
        ex, ps = executor, executor.ps
        self.ex, self.st, self.hooks = ex, st, hooks
        cfg = ex.config
        self.plan = DynamicPlan(ps.pp_size, ex.vpp_size, st.num_microbatches, ps.pp_rank,
                                cfg.microbatch_group_size, cfg.dynamic_order)
        self.state = DynamicState(self.plan)
        # One side stream for every receive and send: only completed events are waited on it.
        self.stream = torch.cuda.Stream(ex._device) if ex._device.type == "cuda" else None
        shape = ex._activation_shape(st, 0)  # every micro-batch has the same shape
        self.inboxes: dict[str, _Inbox] = {}
        for kind, peer in ((ACT, (ps.pp_rank - 1) % ps.pp_size), (GRAD, (ps.pp_rank + 1) % ps.pp_size)):
            if self.plan.expected(kind):
                self.inboxes[kind] = _Inbox(ex.channels, kind, peer, self.plan.expected(kind), shape,
                                            ex._dtype, ex._device, self.stream)
        self.outboxes: dict[str, _Outbox] = {}  # created on a kind's first send
        self.lockstep = ps.cpu_groups.get("tp-cp") if ps.tp_size * ps.cp_size > 1 else None
        self.timeout_s = ps.timeout.total_seconds() if ps.timeout else 600.0  # Megatron: 10 minutes

    def run(self) -> None:
        finished = False
        try:
            while not self.state.finished:
                self._execute(self._next_task())
            self._drain()
            finished = True
        finally:
            for box in [*self.inboxes.values(), *self.outboxes.values()]:
                box.close(finished)

    def _next_task(self) -> Task:
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
        """Send what may go; True once all sends have completed."""
        return all([box.pump() for box in self.outboxes.values()])  # a list: pump every one

    def _drain(self) -> None:
        """Send this rank's last messages and wait for them (their receivers post the matching
        receives as they poll), with the same timeout as for an input."""
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
        got = ", ".join(f"{k} {n}/{i.expected} ({n + len(i.announced) + (i.arriving is not None)} announced)"
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
        self.state.complete(task)
        out = self.plan.output_of(task)
        if out is None:
            return
        peer, sent = out
        payload = self.ex._outgoing(Action(Op.SEND, task.microbatch, task.chunk, sent.kind, peer), self.st)
        if sent.kind not in self.outboxes:
            self.outboxes[sent.kind] = _Outbox(self.ex.channels, sent.kind, peer, self.stream)
        self.outboxes[sent.kind].put(sent, payload)


def _idle(polls: int) -> None:
    """Yield the CPU while waiting: a few ms of bare yields, then sleeps growing to 0.2 ms."""
    over = polls - _SPIN_POLLS
    time.sleep(0 if over < 0 else min(_MAX_SLEEP_S, _SLEEP_STEP_S * (over + 1)))


def run_dynamic_step(executor, st, hooks) -> None:
    """Every forward and backward of this rank for one training step, in readiness order."""
    _DynamicStep(executor, st, hooks).run()

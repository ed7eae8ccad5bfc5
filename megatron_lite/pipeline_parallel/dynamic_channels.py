"""The two ends of a `--use-dpp` channel for one training step (protocol: dynamic_executor.py),
each driven by a helper thread so that a pipeline hop does not wait for the main thread.

The main thread launches several ms of kernels per compute and only comes back between tasks;
a send whose data is ready, or a header that has arrived, would wait for it. So:

* `Outbox`: the main thread only queues (message, payload, CUDA event after its compute). The
  outbox's thread takes them in order: waits for the event on the host, then for the previous
  send's completion, sends the header on gloo and launches the payload send (NCCL from the
  side stream, or gloo) right after it.
* `Inbox`: the inbox's thread receives each header, waits for the previous payload receive's
  completion and posts this one's (side stream); the main thread's `poll()` picks the posted
  receives up without blocking and sees them complete.

Host waits release the GIL (gloo's wait, CUDA event synchronize, sleeps). An NCCL work's
wait() only orders streams, so the host learns of its completion from `is_completed()`: the
main thread polls the last one of a channel itself (`pump`, `poll`), and a thread waits for the
previous one only when the next message is due, by when it has usually completed (a transfer
takes less than a compute), so the threads seldom poll. gloo works complete only through
wait(), which the threads call at once. What a thread raises is kept and raised again on the
main thread by the next `pump`/`poll`. Each channel is one process group used by one thread on
each end (a channel is a direction).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

import torch

from megatron_lite.pipeline_parallel.dynamic import Message

# Between is_completed() polls of an NCCL work in a helper thread: from 20 us, doubling up to
# 0.1 ms (short against a compute), so that a long wait does not take the GIL from the main
# thread every few tens of us (Linux sleeps at least ~50 us anyway).
_POLL_S, _MAX_POLL_S = 2e-5, 1e-4


class _Helper:
    """A daemon thread running `body(helper)` on `device`; what it raises is kept in `error`."""

    def __init__(self, name: str, body, device: torch.device | None):
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set on close: polling loops give up
        self._body, self._device = body, device
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def check(self, what: str) -> None:
        if self.error is not None:
            raise RuntimeError(what) from self.error

    def close(self, join: bool) -> None:
        # After a failure the thread may be stuck in a gloo wait that will never return: it is
        # a daemon and is left behind rather than joined.
        self.stop.set()
        if join:
            self._thread.join()

    def _run(self) -> None:
        try:
            if self._device is not None:  # a stream's device (with its index)
                torch.cuda.set_device(self._device)  # the current device (and stream) is per thread
            self._body(self)  # passed in: the owner may not hold it yet
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            self.error = e

    def complete(self, work) -> bool:
        """Block until the NCCL `work` has completed; False when told to stop first."""
        delay = _POLL_S
        while not work.is_completed():
            if self.stop.is_set():
                return False
            time.sleep(delay)
            delay = min(2 * delay, _MAX_POLL_S)
        return True


class Inbox:
    """The receiving end of one incoming channel (kind ACT or GRAD) for one step. The thread
    posts each payload receive once its header has arrived, one in flight; the main thread's
    `poll()` moves completed ones, in channel order, to `payloads` until their task takes them."""

    def __init__(self, channels, kind: str, peer: int, expected: int, shape, dtype, device, stream):
        self.channels, self.kind, self.peer, self.expected = channels, kind, peer, expected
        self.shape, self.dtype, self.device, self.stream = shape, dtype, device, stream
        self.announced = 0  # headers received (counted by the thread)
        self._posted: queue.SimpleQueue = queue.SimpleQueue()  # (msg, buffer, work, completed())
        self.arriving: deque[tuple] = deque()  # posted, not yet seen complete, in channel order
        self.position: dict[Message, int] = {}  # completion order on this channel
        self.payloads: dict[Message, tuple] = {}  # completed and not yet taken: (buffer, work)
        self._thread = _Helper(f"dpp-{kind}-inbox", self._run, None if stream is None else stream.device)

    @property
    def arrived(self) -> int:
        return len(self.position)

    def poll(self) -> int:
        """Record completed payloads (never blocks); returns the number completed so far."""
        self._thread.check(f"receiving {self.kind} from pipeline rank {self.peer} failed")
        while True:
            try:
                self.arriving.append(self._posted.get_nowait())
            except queue.Empty:
                break
        # In order: the sender sends one at a time, and the thread posts one at a time.
        while self.arriving and self.arriving[0][3]():
            msg, buf, work, _ = self.arriving.popleft()
            self.position[msg] = len(self.position)
            self.payloads[msg] = (buf, work)
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
            assert self.announced == self.expected and not self.arriving and not self.payloads, \
                (self.kind, self.announced, self.expected, list(self.payloads))
        self._thread.close(join=finished)

    def _run(self, helper: _Helper) -> None:
        cuda, previous = self.stream is not None, None  # previous: the NCCL receive in flight
        header = torch.empty(2, dtype=torch.int64)  # micro-batch, chunk of the receiving task
        pending = self.channels.irecv_header(header, self.kind, self.peer)
        for i in range(self.expected):
            pending.wait()  # on the host (gloo), without the GIL
            msg = Message(self.kind, *header.tolist())
            self.announced += 1
            if i + 1 < self.expected:  # the next header may come while this payload does
                header = torch.empty(2, dtype=torch.int64)
                pending = self.channels.irecv_header(header, self.kind, self.peer)
            # One receive in flight per channel. Usually complete already: the sender sent this
            # header only once its previous send had completed.
            if previous is not None and not helper.complete(previous):
                return
            buf, work = self._post()
            if cuda:  # the main thread polls the work itself: no hop through this thread
                self._posted.put((msg, buf, work, work.is_completed))
                previous = work
                continue
            flag = threading.Event()
            self._posted.put((msg, buf, work, flag.is_set))
            work.wait()  # gloo: completes only through wait(); the main thread sees the flag
            flag.set()

    def _post(self) -> tuple:
        if self.stream is None:
            buf = torch.empty(self.shape, dtype=self.dtype)
            return buf, self.channels.irecv(buf, self.kind, self.peer)
        # From the side stream, where nothing is queued: NCCL makes an operation wait for the
        # work queued on the current stream, and the payload should land while the stage
        # computes. Allocated there too, so the buffer is not one the compute stream still uses.
        with torch.cuda.stream(self.stream):
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            return buf, self.channels.irecv(buf, self.kind, self.peer)


class Outbox:
    """The sending end of one outgoing channel: messages leave in order, each announced by its
    header once its data is ready and the previous send has completed."""

    def __init__(self, channels, kind: str, peer: int, stream):
        self.channels, self.kind, self.peer, self.stream = channels, kind, peer, stream
        self.queued = 0  # messages put (main thread)
        self.launched = 0  # headers sent and payload sends launched (thread)
        self._last = None  # completed() of the last send launched (thread)
        self._items: queue.SimpleQueue = queue.SimpleQueue()  # (msg, payload, event) or None
        device = None if stream is None else stream.device
        self._thread = _Helper(f"dpp-{kind}-outbox", self._run, device)

    def put(self, msg: Message, payload: torch.Tensor) -> None:
        """Queue `payload`, just computed on the current stream, for the receiver's `msg`."""
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self.queued += 1
        self._items.put((msg, payload, ready))

    def pump(self) -> bool:
        """Never blocks; True once everything put has been sent."""
        self._thread.check(f"sending {self.kind} to pipeline rank {self.peer} failed")
        # In this order: the thread sets `_last` before it counts the launch.
        launched = self.launched
        last = self._last
        return launched == self.queued and (last is None or last())

    def close(self, finished: bool) -> None:
        self._items.put(None)
        self._thread.close(join=finished)

    def _run(self, helper: _Helper) -> None:
        previous = None  # the NCCL send in flight: (work, header, payload), kept alive
        while (item := self._items.get()) is not None:
            msg, payload, ready = item
            if ready is not None:
                # Not computed yet: no kernel is launched before its data is there. Blocks on
                # the host without the GIL (spinning or yielding: the CUDA context's flags).
                ready.synchronize()
            # One send in flight per channel; usually complete already (a compute took longer).
            if previous is not None and not helper.complete(previous[0]):
                return
            previous = self._send(msg, payload, ready)

    def _send(self, msg: Message, payload: torch.Tensor, ready) -> tuple | None:
        """Announce and launch one message; returns the NCCL send in flight (None on gloo:
        waited for here)."""
        header = torch.tensor([msg.microbatch, msg.chunk], dtype=torch.int64)
        header_work = self.channels.isend_header(header, self.kind, self.peer)
        # The payload send right after its header, with nothing in between: the receiver's
        # receive, posted when the header arrives, waits only for this.
        if ready is None:
            work = self.channels.isend(payload, self.kind, self.peer)
        else:
            # From the idle side stream: from the compute stream the send would also wait for
            # every compute queued since. The event has completed; waiting on it only states
            # the dependency to the stream.
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                work = self.channels.isend(payload, self.kind, self.peer)
        if ready is not None:
            self._last = work.is_completed
            self.launched += 1
            header_work.wait()
            return work, header, payload
        flag = threading.Event()
        self._last = flag.is_set
        self.launched += 1
        header_work.wait()
        work.wait()  # gloo: completes only through wait(); pump() sees the flag
        flag.set()
        return None

"""The dynamic (MegatronDPP, `--use-dpp`) schedule policy on CPU, through the timed simulator:
200 randomized runs (shapes, orders, group sizes, per-stage slowdowns, per-task jitter,
transfer latency) finish without deadlock, run every compute once in dependency order, keep
each chunk's micro-batches in order and stay within the static schedule's activation bound;
with equal stages the dynamic orders are as fast as the static schedule; the window is what
prevents the deadlock of a plain in-flight cap. Also MegatronDPP's launch flags, the trace
statistics telling a dynamic order from the static one, and the channel threads
(dynamic_channels.py) on fake links: one payload in flight per channel, a header before its
payload, a thread's failure raised on the main thread."""
import queue
import random
import threading
import time

import pytest
import torch

from megatron_lite.config.arguments import parse_args
from megatron_lite.config.errors import ConfigError
from megatron_lite.config.validation import validate_args
from megatron_lite.pipeline_parallel.dynamic import (
    BREADTH_FIRST,
    DEPTH_FIRST,
    DynamicPlan,
    DynamicState,
    Message,
    Task,
)
from megatron_lite.pipeline_parallel.dynamic_channels import Inbox, Outbox
from megatron_lite.pipeline_parallel.dynamic_executor import LaunchQueue
from megatron_lite.pipeline_parallel.schedules import ACT, GRAD, Op, ScheduleError, in_flight_bound
from megatron_lite.pipeline_parallel.simulate import ScheduleDeadlock, simulate, stage_durations
from megatron_lite.pipeline_parallel.trace import TraceEvent, write_chrome_trace
from tools import pipeline_trace_stats as trace_stats


def _random_case(rng):
    while True:
        pp, vpp = rng.choice([2, 3, 4]), rng.choice([1, 2, 3])
        m = rng.randint(pp, 3 * pp)
        n, order = rng.choice([None, rng.randint(pp, m)]), rng.choice([BREADTH_FIRST, DEPTH_FIRST])
        try:
            DynamicPlan(pp, vpp, m, 0, n, order)
        except ScheduleError:
            continue  # a group size the static schedule refuses too (spec §6.2)
        return pp, vpp, m, n, order


def _check_run(pp, vpp, m, n, order, result, latency):
    plans = [DynamicPlan(pp, vpp, m, r, n, order) for r in range(pp)]
    ends = {}  # (rank, task) -> end time
    for r, line in enumerate(result.timelines):
        tasks = [x.task for x in line]
        assert sorted(tasks, key=str) == sorted({Task(op, mb, c) for op in (Op.FORWARD, Op.BACKWARD)
                                                 for mb in range(m) for c in range(vpp)}, key=str)
        for c in range(vpp):  # micro-batch order per chunk: gradients accumulate as in the static order
            for op in (Op.FORWARD, Op.BACKWARD):
                assert [t.microbatch for t in tasks if t.chunk == c and t.op is op] == list(range(m))
        assert result.peak_in_flight[r] <= plans[r].warmup + 1
        for x in line:
            ends[(r, x.task)] = x.end
    for r, line in enumerate(result.timelines):
        for x in line:
            v = x.task.chunk * pp + r
            if x.task.op is Op.FORWARD and v > 0:
                producer = ((v - 1) % pp, Task(Op.FORWARD, x.task.microbatch, (v - 1) // pp))
            elif x.task.op is Op.BACKWARD and v < pp * vpp - 1:
                producer = ((v + 1) % pp, Task(Op.BACKWARD, x.task.microbatch, (v + 1) // pp))
            else:
                producer = None
            if producer is not None:
                assert x.start >= ends[producer] + latency - 1e-9, (r, x.task, producer)
            if x.task.op is Op.BACKWARD:
                assert x.start >= ends[(r, Task(Op.FORWARD, x.task.microbatch, x.task.chunk))]


def test_200_randomized_runs_never_deadlock():
    rng = random.Random(18)
    for _ in range(200):
        pp, vpp, m, n, order = _random_case(rng)
        slow = {r: rng.choice([1, 1, 1.3, 2, 5]) for r in range(pp)}
        jitter: dict = {}

        def duration(r, task, slow=slow, jitter=jitter):
            base = 1.0 if task.op is Op.FORWARD else 2.0
            return jitter.setdefault((r, task), slow[r] * base * rng.uniform(0.2, 3.0))

        latency = rng.choice([0.0, 0.1, 1.0])
        result = simulate(pp, vpp, m, duration, order=order, group_size=n, latency=latency)
        _check_run(pp, vpp, m, n, order, result, latency)


@pytest.mark.parametrize("pp,vpp,m", [(2, 1, 8), (2, 2, 8), (2, 2, 16), (4, 2, 8), (4, 4, 8), (3, 2, 9)])
def test_equal_stages_are_as_fast_as_the_static_schedule(pp, vpp, m):
    # A chunk holds 1/VPP of a stage's layers; backward costs twice the forward.
    durations = stage_durations({(r, op): (2.0 if op == "B" else 1.0) / vpp
                                 for r in range(pp) for op in "FB"})
    static = simulate(pp, vpp, m, durations, dynamic=False)
    assert static.bubble == pytest.approx((pp - 1) / (vpp * m))
    for order in (BREADTH_FIRST, DEPTH_FIRST):
        assert simulate(pp, vpp, m, durations, order=order).span <= static.span + 1e-9, order
    # With transfer latency the greedy start of whatever is ready can cost: not for the default
    # breadth-first order, which even gains; depth-first's tighter window does lose a little.
    for latency in (0.01, 0.05, 0.2):
        slow = simulate(pp, vpp, m, durations, dynamic=False, latency=latency).span
        assert simulate(pp, vpp, m, durations, latency=latency).span <= slow + 1e-9, latency


def test_orders_and_bounds():
    # Breadth-first: MegatronDPP's chunk-major list (one group of all M); depth-first: groups of N.
    bf, df = DynamicPlan(2, 2, 4, 0, None, BREADTH_FIRST), DynamicPlan(2, 2, 4, 0, None, DEPTH_FIRST)
    by_priority = lambda p: sorted(p.forward_priority, key=p.forward_priority.get)  # noqa: E731
    assert by_priority(bf) == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]
    assert by_priority(df) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    assert df.warmup + 1 == in_flight_bound(2, 2, 4, 0) and bf.warmup + 1 == in_flight_bound(2, 2, 4, 0, 4)
    # Messages: rank 0 of PP 2 receives chunk 1's activations (from rank 1's chunk 0) and the
    # gradients of both chunks; its chunk-0 forward output goes to rank 1's chunk 0.
    assert (df.expected(ACT), df.expected(GRAD)) == (4, 8)
    assert df.output_of(Task(Op.FORWARD, 3, 0)) == (1, Message(ACT, 3, 0))
    assert DynamicPlan(2, 2, 4, 1).output_of(Task(Op.FORWARD, 3, 0)) == (0, Message(ACT, 3, 1))
    assert df.output_of(Task(Op.BACKWARD, 2, 0)) is None and df.input_of(Task(Op.FORWARD, 2, 0)) is None


def test_alternates_backward_and_forward_like_megatron_dpp():
    state = DynamicState(DynamicPlan(2, 1, 4, 1))  # last stage: nothing to receive for backwards
    everything = lambda msg: True  # noqa: E731
    picked = []
    while not state.finished:
        task = state.pick(everything)
        picked.append(str(task))
        state.complete(task)
    # MegatronDPP's loop body: a ready backward, then a ready forward.
    assert picked == ["F0.0", "B0.0", "F1.0", "B1.0", "F2.0", "B2.0", "F3.0", "B3.0"]


class _PlainCap(DynamicState):
    """MegatronDPP's chunk-major list under a plain in-flight cap (the depth-first schedule's
    bound) instead of the window."""

    def candidates(self):
        forwards, backwards = [], []
        for c in range(self.plan.vpp):
            if self.next_forward[c] < self.plan.m and self.in_flight < self.plan.warmup + 1:
                forwards.append(Task(Op.FORWARD, self.next_forward[c], c))
            if self.next_backward[c] < self.next_forward[c]:
                backwards.append(Task(Op.BACKWARD, self.next_backward[c], c))
        return forwards, backwards


def _chunk_major_capped(rank: int, picker_type):
    plan = DynamicPlan(2, 2, 8, rank, None, DEPTH_FIRST)  # cap W + 1 of groups of PP
    chunk_major = DynamicPlan(2, 2, 8, rank, None, BREADTH_FIRST)
    plan.forward_priority = chunk_major.forward_priority
    plan.backward_priority = chunk_major.backward_priority
    return picker_type(plan)


def test_a_plain_in_flight_cap_deadlocks_where_the_window_does_not():
    durations = stage_durations({(r, op): 1.0 for r in range(2) for op in "FB"})
    with pytest.raises(ScheduleDeadlock):
        simulate(2, 2, 8, durations, pickers=[_chunk_major_capped(r, _PlainCap) for r in (0, 1)])
    # The same priorities and bound through the window run to the end.
    simulate(2, 2, 8, durations, pickers=[_chunk_major_capped(r, DynamicState) for r in (0, 1)])


# ---- MegatronDPP's launch flags (config/dpp_flags.py) --------------------------------------------
_BASE = ("--num-layers 8 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
         "--max-position-embeddings 64 --micro-batch-size 1 --global-batch-size 8 --mock-data "
         "--tokenizer-type NullTokenizer --vocab-size 128 --train-iters 10 --lr 1e-3")


def _validate(extra: str, world: int = 2):
    warnings = []
    args = validate_args(parse_args(f"{_BASE} {extra}".split()), world, cuda_available=False,
                         warn=warnings.append)
    return args, warnings


def test_megatron_dpp_launch_flags_run_with_one_warning():
    # The flags of MegatronDPP's train_gpt3_175b_distributed.sh.
    args, warnings = _validate("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
                               "--use-dpp --node-ips 192.168.0.7,192.168.0.2 --workload 1048576 --num-gpus 4")
    assert args.use_dpp and args.dpp_order == BREADTH_FIRST
    transport = [w for w in warnings if "--workload" in w]
    assert len(transport) == 1 and "--node-ips" in transport[0] and "--num-gpus" in transport[0]
    assert "\n" not in transport[0]
    args, _ = _validate("--pipeline-model-parallel-size 2 --use-dpp --dpp-order depth-first")
    assert args.dpp_order == DEPTH_FIRST and args.dpp_gpu_queue_depth == 0
    args, _ = _validate("--pipeline-model-parallel-size 2 --use-dpp --dpp-gpu-queue-depth 2")
    assert args.dpp_gpu_queue_depth == 2


@pytest.mark.parametrize("extra,words", [
    ("--use-dpp", "--pipeline-model-parallel-size > 1"),
    ("--pipeline-model-parallel-size 2 --dpp-order depth-first", "--dpp-order needs --use-dpp"),
    ("--pipeline-model-parallel-size 2 --dpp-gpu-queue-depth 1", "--dpp-gpu-queue-depth needs --use-dpp"),
    ("--pipeline-model-parallel-size 2 --use-dpp --dpp-gpu-queue-depth -1", "--dpp-gpu-queue-depth"),
    ("--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 --use-dpp "
     "--microbatch-group-size-per-virtual-pipeline-stage 2", "depth-first"),
])
def test_dpp_flag_errors_name_the_flags(extra, words):
    with pytest.raises(ConfigError, match=words):
        _validate(extra)


# ---- the trace shows the dynamic order (tools/pipeline_trace_stats.py) -------------------------
def _as_trace(result, steps: int = 2) -> list[TraceEvent]:
    """A simulated step as a traced run: one global rank per pipeline rank, times in us."""
    span = result.span
    return [TraceEvent(r, r, s, x.task.op.value, x.task.microbatch, x.task.chunk,
                       (s * span + x.start) * 1e3, (s * span + x.end) * 1e3)
            for s in range(steps) for r, line in enumerate(result.timelines) for x in line]


def test_trace_stats_tell_the_dynamic_order_from_the_static(tmp_path, capsys):
    # The second stage is 30% slower and jittery: --use-dpp departs from the static order.
    rng = random.Random(3)
    jitter: dict = {}

    def duration(r, task):
        return jitter.setdefault((r, task), (1.3 if r == 1 else 1.0) * (2 if task.op is Op.BACKWARD else 1)
                                 * rng.uniform(0.5, 1.5))

    paths = {}
    for name, kw in (("static", {"dynamic": False}), ("dpp", {"order": BREADTH_FIRST})):
        paths[name] = tmp_path / f"{name}.json"
        write_chrome_trace(_as_trace(simulate(2, 2, 8, duration, **kw)), str(paths[name]))
    trace_stats.main([str(paths["dpp"]), "--compare", str(paths["static"])])
    out = capsys.readouterr().out
    assert "order: dynamic (2 of 2 rank-steps differ" in out, out
    assert "order: the static schedule (0 of 2 rank-steps differ" in out, out
    assert "with these times: static" in out
    assert "dynamic breadth-first" in out and "dynamic depth-first" in out
    assert "step span" in out and "x); bubble" in out



class _Work:
    """A fake gloo work: wait() blocks until the test completes it."""

    def __init__(self, done: bool = False):
        self.done = threading.Event()
        if done:
            self.done.set()

    def wait(self):
        assert self.done.wait(10), "fake work never completed"

    def is_completed(self):
        return self.done.is_set()


class _Links:
    """Fake channels: logs every post, hands out queued headers, payload works the test
    completes one by one."""

    def __init__(self):
        self.log, self.works, self.headers = [], [], queue.SimpleQueue()

    def irecv_header(self, header, kind, peer):
        work = _Work()

        def wait(work=work):
            header.copy_(torch.tensor(self.headers.get(timeout=10)))
            work.done.set()
        work.wait = wait
        return work

    def isend_header(self, header, kind, peer):
        self.log.append(("header", tuple(header.tolist())))
        return _Work(done=True)

    def _payload(self, what):
        self.log.append(what)
        self.works.append(_Work())
        return self.works[-1]

    def irecv(self, buffer, kind, peer):
        buffer.fill_(len(self.works))
        return self._payload("recv")

    def isend(self, tensor, kind, peer):
        return self._payload(("send", tensor.item()))


def _until(condition):
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(1e-3)


def test_inbox_posts_a_receive_per_header_one_in_flight():
    links = _Links()
    inbox = Inbox(links, ACT, 0, 2, (1,), torch.float32, torch.device("cpu"), None)
    links.headers.put([0, 1])
    links.headers.put([1, 1])
    _until(lambda: links.log == ["recv"])
    time.sleep(0.05)
    assert links.log == ["recv"] and inbox.poll() == 0  # the second waits for the first
    links.works[0].done.set()
    _until(lambda: inbox.poll() == 1 and links.log == ["recv", "recv"])
    links.works[1].done.set()
    _until(lambda: inbox.poll() == 2)
    assert inbox.take(Message(ACT, 1, 1)).item() == 1 and inbox.take(Message(ACT, 0, 1)).item() == 0
    inbox.close(True)


def test_outbox_sends_in_order_one_in_flight_header_first():
    links = _Links()
    outbox = Outbox(links, GRAD, 1, None)
    outbox.put(Message(GRAD, 0, 0), torch.tensor(5.0))
    outbox.put(Message(GRAD, 1, 0), torch.tensor(6.0))
    _until(lambda: outbox.launched == 1)
    time.sleep(0.05)
    assert outbox.launched == 1 and not outbox.pump()
    links.works[0].done.set()
    _until(lambda: outbox.launched == 2)
    assert not outbox.pump()
    links.works[1].done.set()
    _until(outbox.pump)
    assert links.log == [("header", (0, 0)), ("send", 5.0), ("header", (1, 0)), ("send", 6.0)]
    outbox.close(True)


def test_a_channel_thread_failure_is_raised_on_the_main_thread():
    links = _Links()
    links.irecv_header = lambda *a: (_ for _ in ()).throw(ConnectionError("peer gone"))
    inbox = Inbox(links, GRAD, 3, 1, (1,), torch.float32, torch.device("cpu"), None)
    with pytest.raises(RuntimeError, match="receiving grad from pipeline rank 3 failed"):
        _until(lambda: inbox.poll() < 0)
    inbox.close(False)


# ---- the GPU queue depth (--dpp-gpu-queue-depth, dynamic_executor.LaunchQueue) ----------------
class _FakeEvent:
    """Stands for a CUDA event: finished once the test says the GPU got past it."""

    def __init__(self, gpu):
        self.gpu, self.index = gpu, None

    def record(self):
        self.index = self.gpu["launched"]
        self.gpu["launched"] += 1

    def query(self):
        return self.index < self.gpu["finished"]


def test_launch_queue_is_full_while_more_than_depth_computes_are_unfinished():
    gpu = {"launched": 0, "finished": 0}
    q = LaunchQueue(2, torch.device("cpu"), make_event=lambda: _FakeEvent(gpu))
    assert not q.full()
    q.launched()
    q.launched()
    assert not q.full()  # two unfinished: the next may be launched behind them
    q.launched()
    assert q.full()  # three: the next pick waits
    gpu["finished"] = 1
    assert not q.full() and len(q.pending) == 2  # the finished one is dropped
    gpu["finished"] = 3
    assert not q.full() and not q.pending


def test_launch_queue_without_a_limit_or_on_cpu_keeps_nothing():
    for q in (LaunchQueue(0, torch.device("cpu"), make_event=lambda: pytest.fail("no event with depth 0")),
              LaunchQueue(1, torch.device("cpu"))):  # CPU computes are synchronous: no CUDA events
        for _ in range(3):
            q.launched()
        assert not q.full() and not q.pending

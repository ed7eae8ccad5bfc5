"""Pipeline schedules as data (spec §6): order, dependencies, channel order, memory bound."""
import itertools

import pytest
import torch

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.distributed.random import build_rng_tracker
from megatron_lite.pipeline_parallel import schedules
from megatron_lite.pipeline_parallel.chunks import build_model_chunks
from megatron_lite.pipeline_parallel.executor import PipelineExecutor
from megatron_lite.pipeline_parallel.layout import build_layout
from megatron_lite.pipeline_parallel.schedules import (
    ACT,
    Op,
    ScheduleError,
    build,
    build_all,
    in_flight_bound,
    in_flight_per_chunk,
    schedule_table,
    warmup_count,
)
from tests.model_utils import tiny_batch, tiny_config

CASES = [  # (PP, VPP, M, group size N or None = PP)
    (1, 1, 4, None), (2, 1, 1, None), (2, 1, 5, None), (4, 1, 3, None), (4, 1, 8, None),
    (2, 2, 4, None), (2, 3, 6, None), (4, 2, 8, None), (4, 4, 8, None), (4, 4, 8, 8),
    (2, 2, 5, 5), (3, 2, 7, 4), (4, 2, 9, 5), (4, 3, 12, 6), (2, 4, 2, None),
]


def _computes(actions):
    return [(a.op, a.microbatch, a.chunk) for a in actions if a.op in (Op.FORWARD, Op.BACKWARD)]


def _message(a, pp, rank):
    """Global id of the tensor a SEND produces / a RECV consumes: (kind, mb, consumer stage)."""
    stage = a.chunk * pp + rank
    if a.op is Op.RECV:
        return a.kind, a.microbatch, stage
    return a.kind, a.microbatch, stage + (1 if a.kind == ACT else -1)


def simulate(all_actions, pp, vpp):
    """Run every rank's action list against the others. A transfer completes once both ends
    have posted it (rendezvous, the strictest p2p semantics); a compute needs its input
    transfer complete (and a backward its own forward); a SYNC needs all of the rank's
    transfers complete. Returns the global order in which computes ran; fails on deadlock."""
    pcs = [0] * pp
    posted = {}  # message -> set of "send"/"recv"
    mine = [set() for _ in range(pp)]
    done_fwd = [set() for _ in range(pp)]
    ran = []

    def complete(m):
        return posted.get(m, set()) == {"send", "recv"}

    while any(pcs[r] < len(all_actions[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pcs[r] < len(all_actions[r]):
                a = all_actions[r][pcs[r]]
                if a.op in (Op.SEND, Op.RECV):
                    m = _message(a, pp, r)
                    side = "send" if a.op is Op.SEND else "recv"
                    assert side not in posted.setdefault(m, set()), f"{m} posted twice by {side}"
                    posted[m].add(side)
                    mine[r].add(m)
                elif a.op is Op.SYNC:
                    if not all(complete(m) for m in mine[r]):
                        break
                else:
                    stage, last = a.chunk * pp + r, pp * vpp - 1
                    needs_input = (a.op is Op.FORWARD and stage > 0) or (a.op is Op.BACKWARD and stage < last)
                    if needs_input:
                        m = (ACT if a.op is Op.FORWARD else "grad", a.microbatch, stage)
                        assert m in mine[r], f"rank {r}: {a} runs before its receive was posted"
                        if not complete(m):
                            break
                    if a.op is Op.BACKWARD:
                        assert (a.microbatch, a.chunk) in done_fwd[r], f"rank {r}: {a} before its forward"
                    else:
                        done_fwd[r].add((a.microbatch, a.chunk))
                    ran.append((r, a.op, a.microbatch, a.chunk))
                pcs[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: str(all_actions[r][pcs[r]]) for r in range(pp) if pcs[r] < len(all_actions[r])}
            raise AssertionError(f"deadlock: {stuck}")
    assert all(complete(m) for m in posted), "a transfer was posted on one end only"
    return ran


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("pp,vpp,m,n", CASES)
def test_every_input_is_produced_before_use_and_nothing_deadlocks(pp, vpp, m, n, forward_only, overlap):
    actions = build_all(pp, vpp, m, group_size=n, forward_only=forward_only, overlap_p2p_comm=overlap)
    ran = simulate(actions, pp, vpp)
    for r in range(pp):
        # Every forward (and backward) of every (micro-batch, chunk) exactly once.
        computes = _computes(actions[r])
        expected = {(Op.FORWARD, mb, c) for mb in range(m) for c in range(vpp)}
        if not forward_only:
            expected |= {(Op.BACKWARD, mb, c) for mb in range(m) for c in range(vpp)}
        assert sorted(computes) == sorted(expected) and len(computes) == len(expected)
        assert [x[1:] for x in ran if x[0] == r] == computes
        # Each p2p channel (kind, sender -> receiver) carries its messages in the same order at
        # both ends: what makes per-channel FIFO links (p2p.py) deadlock free.
    for src, dst in itertools.product(range(pp), repeat=2):
        for kind in (ACT, "grad"):
            sent = [_message(a, pp, src) for a in actions[src]
                    if a.op is Op.SEND and a.kind == kind and a.peer == dst]
            recvd = [_message(a, pp, dst) for a in actions[dst]
                     if a.op is Op.RECV and a.kind == kind and a.peer == src]
            assert sent == recvd, (kind, src, dst)


@pytest.mark.parametrize("pp,vpp,m,n", CASES)
def test_in_flight_micro_batches_never_exceed_the_bound(pp, vpp, m, n):
    for r, actions in enumerate(build_all(pp, vpp, m, group_size=n)):
        live, peak = 0, 0
        for a in actions:
            live += {Op.FORWARD: 1, Op.BACKWARD: -1}.get(a.op, 0)
            peak = max(peak, live)
        assert peak == in_flight_bound(pp, vpp, m, r, n)
        # spec §6.1/§6.2 bounds: 1F1B keeps at most PP - r micro-batches per rank.
        if vpp == 1:
            assert peak == min(pp - r, m)
        else:
            assert peak <= min(2 * (pp - r - 1) + (vpp - 1) * (n or pp) + 1, m * vpp)


def _fb(seq):
    return [(Op.FORWARD if s[0] == "F" else Op.BACKWARD, int(s[1:]), 0) for s in seq.split()]


def test_1f1b_order_spec_6_1():
    # PP=4, M=6: rank r runs min(PP-r-1, M) warm-up forwards, then 1F1B, then the cool-down.
    assert _computes(build(4, 1, 6, 0)) == _fb("F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5")
    assert _computes(build(4, 1, 6, 2)) == _fb("F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5")
    assert _computes(build(4, 1, 6, 3)) == _fb("F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5")
    assert _computes(build(4, 1, 2, 0)) == _fb("F0 F1 B0 B1")  # warm-up capped at M
    assert _computes(build(1, 1, 3, 0)) == _fb("F0 B0 F1 B1 F2 B2")  # gradient accumulation
    assert _computes(build(4, 1, 3, 1, forward_only=True)) == _fb("F0 F1 F2")


def _classic(k, pp, vpp):
    """Pre-2024 Megatron formula, equal to the table with N = PP (spec §6.2)."""
    return (k // (pp * vpp)) * pp + k % pp, (k % (pp * vpp)) // pp


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 4), (4, 2, 8), (4, 4, 8), (3, 3, 9), (2, 4, 6)])
def test_interleaved_order_spec_6_2(pp, vpp, m):
    total = m * vpp
    for r in range(pp):
        w = min(2 * (pp - r - 1) + (vpp - 1) * pp, total)
        assert warmup_count(pp, vpp, m, r) == w
        fwd = [(Op.FORWARD, *_classic(k, pp, vpp)) for k in range(total)]
        bwd = []
        for k in range(total):
            mb, c = _classic(k, pp, vpp)
            bwd.append((Op.BACKWARD, mb, vpp - 1 - c))
        expected = fwd[:w] + [x for i in range(total - w) for x in (fwd[w + i], bwd[i])] + bwd[total - w:]
        assert _computes(build(pp, vpp, m, r)) == expected


def test_schedule_table_groups_spec_6_2():
    # M=7, N=4: groups [0..3], [4..6] (a group starting at g is the last when g + N >= M).
    assert schedule_table(7, 2, 4) == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1),
                                       (4, 0), (5, 0), (6, 0), (4, 1), (5, 1), (6, 1)]
    assert schedule_table(4, 2, 4) == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]


def _trace_id(mb, table_chunk, pp=4, vpp=4):
    """spec §6.3: the observed trace labels (mb, chunk) by its index in the N = PP table."""
    return (mb // pp) * (pp * vpp) + table_chunk * pp + mb % pp


def test_last_rank_matches_the_observed_trace_spec_6_3():
    pp, vpp, m = 4, 4, 8
    # L=16: the last rank holds layers 3, 7, 11, 15 (0-based).
    assert build_layout(16, pp, vpp).rank_layers(3) == [[4], [8], [12], [16]]
    labels = []
    for op, mb, chunk in _computes(build(pp, vpp, m, 3, group_size=8)):
        table_chunk = chunk if op is Op.FORWARD else vpp - 1 - chunk  # backward: un-mirrored
        labels.append(f"{op.value}{_trace_id(mb, table_chunk)}")
    forwards_first = "F0 F1 F2 F3 F16 F17 F18 F19 F4 F5 F6 F7 F20 F21 F22 F23 F8 F9 F10 F11 " \
                     "F24 F25 F26 F27 F12".split()
    assert labels[:25] == forwards_first
    assert labels[25:35] == "B0 F13 B1 F14 B2 F15 B3 F28 B16 F29".split()
    # Megatron's default (N = PP) instead has 12 warm-up forwards on the last stage, so 13
    # forwards run before the first backward.
    default = _computes(build(pp, vpp, m, 3))
    assert warmup_count(pp, vpp, m, 3) == 12
    assert [op for op, *_ in default[:14]] == [Op.FORWARD] * 13 + [Op.BACKWARD]


@pytest.mark.parametrize("args,words", [
    ((4, 2, 6, 0), ["micro-batches (6)", "--microbatch-group-size-per-virtual-pipeline-stage (4)",
                    "--pipeline-model-parallel-size (4)"]),  # M not a multiple of PP
    ((4, 2, 2, 0), ["<= number of micro-batches (2"]),
    ((1, 2, 4, 0), ["--pipeline-model-parallel-size > 1"]),
])
def test_invalid_interleaved_schedules_name_the_flags(args, words):
    with pytest.raises(ScheduleError) as info:
        build(*args)
    assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(ScheduleError, match="group-size"):
        build(4, 2, 8, 0, group_size=2)  # N < PP


def test_layouts():
    assert build_layout(8, 2).rank_layers(1) == [[5, 6, 7, 8]]
    assert build_layout(8, 2, 2).rank_layers(0) == [[1, 2], [5, 6]]
    # --account-for-embedding/loss-in-pipeline-split: each counts as a layer (Megatron offsets).
    assert build_layout(6, 4, account_for_embedding=True, account_for_loss=True).stage_layers == \
        ((1,), (2, 3), (4, 5), (6,))
    assert build_layout(7, 4, 2, account_for_embedding=True).stage_layers == \
        ((), (1,), (2,), (3,), (4,), (5,), (6,), (7,))
    # --decoder-first/last-pipeline-num-layers.
    assert build_layout(10, 4, first_stage_layers=1, last_stage_layers=3).stage_layers == \
        ((1,), (2, 3, 4), (5, 6, 7), (8, 9, 10))
    assert build_layout(12, 3, 2, first_stage_layers=2, last_stage_layers=2).rank_layers(1) == \
        [[2, 3, 4, 5], [8, 9, 10, 11]]
    lay = build_layout(16, 4, 4)
    assert lay.is_first(0, 0) and not lay.is_first(0, 1) and lay.is_last(3, 3) and not lay.is_last(3, 2)
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size"):
        build_layout(5, 2)
    with pytest.raises(ValueError, match="stage 1 would hold 0"):
        build_layout(2, 4, first_stage_layers=1, last_stage_layers=1)


def test_layout_strings():
    """--pipeline-model-parallel-layout (Megatron's grammar): stages in pipeline order."""
    balanced = build_layout(24, 2, layout="Et*4|t*3|t*3|t*3|t*3|t*3|t*3|t*2L")
    assert balanced.vpp_size == 4
    assert [len(c) for c in balanced.rank_layers(0)] == [4, 3, 3, 3]  # 13 layers
    assert balanced.rank_layers(1) == [[5, 6, 7], [11, 12, 13], [17, 18, 19], [23, 24]]
    # The even split spelled out is the default layout; commas and groups are cosmetic.
    assert build_layout(8, 2, layout="Et*2|t*2|(t*2|)*1t,tL") == build_layout(8, 2, 2)
    assert build_layout(6, 2, layout="Ettt|tttL") == build_layout(6, 2)
    # Embedding or loss alone on their stage (the zero-layer ends account_for_* also makes).
    assert build_layout(4, 2, 2, layout="E|t*2|t*2|L").stage_layers == ((), (1, 2), (3, 4), ())


@pytest.mark.parametrize("layout,message", [
    ("Et|t|tL", "3 transformer layers (t), --num-layers is 4"),
    ("Et*2|t*2m|L", "multi-token prediction layers (m) are not supported"),
    ("Et*2|tx|tL", "unknown layer 'x'"),
    ("tE|t*3L", "the embedding (E) must open the first stage, once"),
    ("Et*2|t*2|L|", "the loss (L) must close the last stage, once"),
    ("Et*3|L|t", "the loss (L) must close the last stage, once"),
    ("Et|t|t|t|L", "5 stages do not divide over --pipeline-model-parallel-size 2"),
    ("Et*2||t*2|L",
     "virtual pipeline stage 1 would hold 0 transformer layers (--pipeline-model-parallel-layout)"),
])
def test_bad_layout_strings_name_the_flag(layout, message):
    with pytest.raises(ValueError) as e:
        build_layout(4, 2, layout=layout)
    assert message in str(e.value), str(e.value)


def test_validation_takes_the_vpp_size_from_the_layout_and_refuses_other_split_flags():
    from megatron_lite.config.validation import ConfigError
    from tests.unit.test_arguments import make
    args = make("--num-layers 8 --pipeline-model-parallel-size 2 --global-batch-size 8 "
                "--pipeline-model-parallel-layout Et*3|t*2|t*2|tL", world=2)
    assert args.virtual_pipeline_model_parallel_size == 2
    args = make("--num-layers 8 --pipeline-model-parallel-size 2 --pipeline-model-parallel-layout Et*5|t*3L",
                world=2)
    assert args.virtual_pipeline_model_parallel_size is None
    for extra in ("--num-layers-per-virtual-pipeline-stage 2", "--decoder-first-pipeline-num-layers 4",
                  "--account-for-loss-in-pipeline-split"):
        with pytest.raises(ConfigError) as e:
            make(f"--num-layers 8 --pipeline-model-parallel-size 2 --global-batch-size 8 {extra} "
                 "--pipeline-model-parallel-layout Et*3|t*2|t*2|tL", world=2)
        flag = extra.split()[0]
        assert str(e.value) == f"--pipeline-model-parallel-layout sets the stages itself: drop {flag}"


def test_validation_rejects_a_layout_with_an_empty_middle_stage():
    from megatron_lite.config.arguments import parse_args
    from megatron_lite.config.validation import ConfigError, validate_args
    args = parse_args(("--num-layers 2 --pipeline-model-parallel-size 4 "
                       "--decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 1 "
                       "--hidden-size 64 --num-attention-heads 4 "
                       "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 1 --train-iters 1 "
                       "--lr 1e-4 --mock-data --tokenizer-type NullTokenizer --vocab-size 100").split())
    with pytest.raises(ConfigError, match="stage 1 would hold 0 transformer layers"):
        validate_args(args, 4)


def test_executor_builds_each_schedule_once(monkeypatch):
    """The executor reuses a step's actions: building them is host time on every step."""
    calls = []
    real = schedules.build
    monkeypatch.setattr(schedules, "build", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    cfg = tiny_config("gpt", num_layers=2, hidden_size=32, num_attention_heads=4)
    ps = ParallelState.create()
    chunks = build_model_chunks(cfg, ps, build_layout(2, 1, 1), 1234, build_rng_tracker(1234, 0, 0, "cpu"))
    executor = PipelineExecutor(chunks, ps)
    def batches():
        for i in range(4):
            tokens, labels = tiny_batch(cfg, seed=i)  # [b, s]
            yield {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(tokens.shape),
                   "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)}

    first = [executor.forward_backward(batches(), 4).totals for _ in range(2)]
    executor.forward_backward(batches(), 4, forward_only=True)
    executor.forward_backward(batches(), 2)
    assert [(a[2], k["forward_only"]) for a, k in calls] == [(4, False), (4, True), (2, False)]
    assert executor.schedule(4) is executor.schedule(4)
    torch.testing.assert_close(first[0], first[1])  # same data, no optimizer step: same losses


@pytest.mark.parametrize("pp,vpp,m,rank,expected", [
    (1, 1, 4, 0, [1]),  # forward, backward, forward, ...
    (2, 1, 8, 0, [2]), (2, 1, 8, 1, [1]),  # 1F1B: warm-up PP - r - 1, plus one
    # Interleaved, N = 2, rank 0 (counted by hand): F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1
    # B0.0 ... holds micro-batches 0-3 of chunk 0 before its first backward, at most 2 of chunk 1.
    (2, 2, 4, 0, [4, 2]),
])
def test_in_flight_per_chunk_counts_what_each_chunk_holds(pp, vpp, m, rank, expected):
    assert in_flight_per_chunk(build(pp, vpp, m, rank), vpp) == expected


@pytest.mark.parametrize("pp,vpp,m", [(2, 2, 8), (2, 4, 8), (4, 2, 8), (4, 2, 12)])
def test_in_flight_per_chunk_covers_the_step_bound(pp, vpp, m):
    """Per-chunk peaks add up to at least the rank's peak, and no chunk holds more than M."""
    for rank in range(pp):
        per_chunk = in_flight_per_chunk(build(pp, vpp, m, rank), vpp)
        assert sum(per_chunk) >= in_flight_bound(pp, vpp, m, rank)
        assert max(per_chunk) <= m

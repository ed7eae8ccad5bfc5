"""GPTDataset index arrays (spec §2.5, §2.6) against transcriptions of Megatron's loops, and the
blending indices (spec §2.8) against the greedy rule."""
import math

import numpy as np
import pytest

from megatron_lite.data.blending_indices import build_blending_indices, build_exhaustive_blending_indices
from megatron_lite.data.index_builders import build_gpt_indices, build_sample_index, plan_epochs


def reference_sample_index(lengths, doc_index, S, E, T, drop_last, extra):
    """The walk of spec §2.6, one token-consuming step at a time (as helpers.cpp does)."""
    if drop_last:
        n = (E * T - extra) // S
    else:
        n = int(math.ceil(np.float32(E * T - extra) / np.float32(S)))
    rows = [(0, 0)]
    pos, off = 0, 0
    while len(rows) <= n:
        need = S + extra
        while need != 0:
            avail = int(lengths[doc_index[pos]]) - off
            need -= avail
            if need <= 0:
                off += avail + need - extra
                need = 0
            else:
                if pos == len(doc_index) - 1:
                    assert len(rows) == n
                    off = int(lengths[doc_index[pos]]) - extra
                    break
                pos += 1
                off = 0
        rows.append((pos, off))
    return np.array(rows)


def reference_epochs(T, N, S, extra):
    E = 1
    while E * T < N * S + extra:
        E += 1
    return E


def test_worked_example_of_the_spec():
    # spec §2.6: S=4, docs of length 5, 3, 10 in order.
    idx = build_sample_index(np.array([5, 3, 10], np.int32), np.array([0, 1, 2], np.int32), 4, 1, 18)
    assert idx.tolist() == [[0, 0], [0, 4], [2, 0], [2, 4], [2, 8]]


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_index_matches_the_reference_walk(extra, drop_last):
    rng = np.random.default_rng(7)
    for trial in range(30):
        n_docs = int(rng.integers(1, 40))
        lengths = rng.integers(0, 12, n_docs).astype(np.int32)
        lengths[rng.integers(0, n_docs)] = max(int(lengths.max()), 3)  # at least a few tokens
        S = int(rng.integers(2, 9))
        E = int(rng.integers(1, 4))
        doc_index = np.tile(np.arange(n_docs, dtype=np.int32), E)
        rng.shuffle(doc_index)
        T = int(lengths.sum())
        if E * T - extra < S:
            continue
        if not drop_last and lengths[doc_index[-1]] < extra:
            continue  # the C++ helper would park the last row at offset -1
        want = reference_sample_index(lengths, doc_index, S, E, T, drop_last, extra)
        got = build_sample_index(lengths, doc_index, S, E, T, drop_last, extra)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def test_samples_are_consecutive_windows_of_the_shuffled_stream():
    lengths = np.array([7, 1, 0, 12, 5, 9, 3], np.int32)
    S, seed, N = 5, 99, 20
    built = build_gpt_indices(np.arange(7, dtype=np.int32), lengths, N, S, seed)
    # Documents as token runs with recognizable ids: doc d holds 100*d + position.
    stream = np.concatenate([100 * d + np.arange(lengths[d]) for d in built.document_index])
    for k in range(len(built.shuffle_index)):
        (b, ob), (e, oe) = built.sample_index[k], built.sample_index[k + 1]
        start = int(lengths[built.document_index[:b]].sum()) + ob
        assert start == k * S
        end = int(lengths[built.document_index[:e]].sum()) + oe + 1
        assert end - start == S + 1
        assert stream[start:end].size == S + 1


@pytest.mark.parametrize("N", [1, 10, 37, 38, 60, 95, 200])
def test_epoch_plan_matches_the_loop(N):
    T, S, extra = 50, 4, 1
    plan = plan_epochs(T, N, S, extra)
    assert plan.num_epochs == reference_epochs(T, N, S, extra)
    if plan.num_epochs > 1:
        sans = ((plan.num_epochs - 1) * T - extra) // S
        assert plan.separate_final_epoch == (N - sans < int(0.8 * ((T - extra) // S)))


def test_indices_are_those_of_megatrons_order_of_random_draws():
    """document index, then (separate epochs) shuffle index, all from one RandomState(seed)."""
    docs = np.arange(3, 9, dtype=np.int32)
    lengths = np.full(10, 6, np.int32)
    N, S, seed = 20, 4, 1234  # 36 tokens per epoch -> 3 epochs, last one separate
    built = build_gpt_indices(docs, lengths, N, S, seed)
    rng = np.random.RandomState(seed)
    first = np.tile(docs, 2)
    rng.shuffle(first)
    last = docs.copy()
    rng.shuffle(last)
    np.testing.assert_array_equal(built.document_index, np.concatenate([first, last]))
    n = built.sample_index.shape[0] - 1
    sans = (2 * 36 - 1) // S
    a = np.arange(sans, dtype=np.uint32)
    rng.shuffle(a)
    b = np.arange(sans, n, dtype=np.uint32)
    rng.shuffle(b)
    np.testing.assert_array_equal(built.shuffle_index, np.concatenate([a, b]))
    assert built.shuffle_index.dtype == np.uint32 and built.document_index.dtype == np.int32
    assert n >= N


def greedy_blend(weights, size):
    counts = [0] * len(weights)
    out = []
    for t in range(size):
        errs = [w * max(t, 1) - c for w, c in zip(weights, counts)]
        i = max(range(len(weights)), key=lambda j: (errs[j], -j))
        out.append((i, counts[i]))
        counts[i] += 1
    return out


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_blending_follows_the_greedy_rule_and_hits_the_weights(compiled):
    first = build_blending_indices([0.5, 0.25, 0.25], 8, compiled)[0]
    assert first.tolist() == [0, 1, 2, 0, 0, 1, 2, 0]
    rng = np.random.default_rng(3)
    for _ in range(5):
        w = rng.random(int(rng.integers(2, 6)))
        w = w / w.sum()
        size = 500
        di, dsi = build_blending_indices(w, size, compiled)
        assert list(zip(di.tolist(), dsi.tolist())) == greedy_blend(list(w), size)
        # Every prefix stays within two samples of its share (one, but for the max(t, 1) start).
        counts = np.zeros(len(w))
        for t, i in enumerate(di, 1):
            counts[i] += 1
            assert np.all(np.abs(counts - w * t) < 2)
    di, _ = build_blending_indices([0.3, 0.7], 1000, compiled)
    assert np.bincount(di).tolist() == [300, 700]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_exhaustive_blending_uses_every_sample_once(compiled):
    di, dsi = build_exhaustive_blending_indices([5, 0, 12, 3], compiled)
    assert np.bincount(di, minlength=4).tolist() == [5, 0, 12, 3]
    for i, n in enumerate([5, 0, 12, 3]):
        assert dsi[di == i].tolist() == list(range(n))

"""Tensor/sequence parallelism against the dense single-process computation (DESIGN rule 4).

Every rank builds the same global tensors from a fixed seed, takes its shard with `shard`,
runs the parallel code and returns CPU tensors; the parent compares them (unsharded with
`unshard` where split) with the dense torch computation: outputs and every gradient.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.init import init_parameter
from megatron_lite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    linear_with_tp,
    reduce_from_tp_region,
    reduce_scatter,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    shard,
    split,
    unshard,
    vocab_parallel_cross_entropy,
)
from megatron_lite.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy

WORLDS = [1, 2, 4]
S, B, H, FFN, V = 4, 2, 8, 16, 8  # every split dim divisible by 4
TOL = dict(rtol=1e-5, atol=1e-5)
TOL_SPEC = dict(rtol=1e-6, atol=1e-6)  # two fp32 algorithms for one quantity


def _randn(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def _close(actual, expected, msg=None, **tol):
    torch.testing.assert_close(actual, expected, msg=msg, **{**TOL, **tol})


def _mine(t, dim, rank, world):
    return shard(t, dim, rank, world)


# ---- plain collectives -------------------------------------------------------------------
def _run_collectives(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        grp = ps.tp_group
        (xs,) = _randn(11, (world, 4, 8, 4))
        x = xs[rank]
        out = {
            "gather1": all_gather(x, 1, grp),
            "gather0_async": all_gather(x, 0, grp, async_op=True).wait(),
            "rs1": reduce_scatter(x, 1, grp),
            "rs0_async": reduce_scatter(x, 0, grp, async_op=True).wait(),
            "split_last": split(x, -1, grp),
        }
        assert torch.equal(x, xs[rank]), "reduce_scatter must not modify its input"
        return out
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_plain_collectives(run_dist, world):
    results = run_dist(world, _run_collectives)
    (xs,) = _randn(11, (world, 4, 8, 4))
    total = xs.sum(0)
    for rank, r in enumerate(results):
        _close(r["gather1"], torch.cat(list(xs), 1))
        _close(r["gather0_async"], torch.cat(list(xs), 0))
        _close(r["rs1"], _mine(total, 1, rank, world))
        _close(r["rs0_async"], _mine(total, 0, rank, world))
        _close(r["split_last"], _mine(xs[rank], -1, rank, world))


# ---- (a) mappings ------------------------------------------------------------------------
def _mapping_data(world):
    x, g = _randn(1, (S, B, H), (S, B, H))  # global input / replicated upstream grad
    xs, gs = _randn(2, (world, S, B, H), (world, S, B, H))  # per-rank inputs / upstream grads
    return x, g, xs, gs


def _mapping_cases(rank, world, grp):
    """name -> (function, this rank's input, this rank's upstream gradient)."""
    x, g, xs, gs = _mapping_data(world)
    m = lambda t, dim: _mine(t, dim, rank, world)
    return {
        "copy_to_tp": (lambda t: copy_to_tp_region(t, grp), x, gs[rank]),
        "reduce_from_tp": (lambda t: reduce_from_tp_region(t, grp), xs[rank], g),
        "scatter_to_tp": (lambda t: scatter_to_tp_region(t, grp), x, m(g, -1)),
        "gather_from_tp": (lambda t: gather_from_tp_region(t, grp), m(x, -1), g),
        "scatter_to_sp": (lambda t: scatter_to_sequence_parallel_region(t, grp), x, m(g, 0)),
        "gather_from_sp": (lambda t: gather_from_sequence_parallel_region(t, grp), m(x, 0), gs[rank]),
        "gather_from_sp_replicated": (
            lambda t: gather_from_sequence_parallel_region(t, grp, tensor_parallel_output_grad=False),
            m(x, 0), g),
        "reduce_scatter_to_sp": (
            lambda t: reduce_scatter_to_sequence_parallel_region(t, grp), xs[rank], m(g, 0)),
    }


def _mapping_expected(rank, world):
    """name -> (expected output, expected input gradient) from the dense tensors."""
    x, g, xs, gs = _mapping_data(world)
    m = lambda t, dim: _mine(t, dim, rank, world)
    return {
        "copy_to_tp": (x, gs.sum(0)),
        "reduce_from_tp": (xs.sum(0), g),
        "scatter_to_tp": (m(x, -1), g),
        "gather_from_tp": (x, m(g, -1)),
        "scatter_to_sp": (m(x, 0), g),
        "gather_from_sp": (x, m(gs.sum(0), 0)),
        "gather_from_sp_replicated": (x, m(g, 0)),
        "reduce_scatter_to_sp": (m(xs.sum(0), 0), g),
    }


def _run_mappings(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        out = {}
        for name, (fn, x, upstream) in _mapping_cases(rank, world, ps.tp_group).items():
            leaf = x.clone().requires_grad_()
            y = fn(leaf * 1.0)  # a non-leaf: reduce_from_tp_region reduces in place
            y.backward(upstream)
            out[name] = (y.detach().clone(), leaf.grad.clone())
        # copy_to's backward must not reduce a gradient that autograd also hands to a
        # sibling branch (both inputs of an add get the same tensor).
        a = torch.ones(S, B, H, requires_grad=True)
        c = torch.ones(S, B, H, requires_grad=True)
        (copy_to_tp_region(a, ps.tp_group) + c * 3.0).backward(torch.full((S, B, H), float(rank + 1)))
        out["sibling"] = (a.grad, c.grad)
        return out
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_mappings_forward_and_backward(run_dist, world):
    results = run_dist(world, _run_mappings)
    for rank, r in enumerate(results):
        for name, (y, grad) in _mapping_expected(rank, world).items():
            _close(r[name][0], y, msg=f"{name} output, rank {rank}")
            _close(r[name][1], grad, msg=f"{name} input grad, rank {rank}")
        a_grad, c_grad = r["sibling"]
        _close(a_grad, torch.full((S, B, H), world * (world + 1) / 2))
        _close(c_grad, torch.full((S, B, H), 3.0 * (rank + 1)))


# ---- (b) column + row parallel MLP -------------------------------------------------------
def _mlp_data(act):
    fc1 = 2 * FFN if act == "swiglu" else FFN  # swiglu: fc1 = [gate; up]
    x, w1, b1, w2, b2, g = _randn(7, (S, B, H), (fc1, H), (fc1,), (H, FFN), (H,), (S, B, H))
    return dict(x=x, w1=w1 * 0.3, b1=b1 * 0.1, w2=w2 * 0.3, b2=b2 * 0.1, g=g)


def _activation(h, act):
    if act == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, -1)
    return F.silu(gate) * up


def _dense_mlp(d, act):
    p = {k: d[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2")}
    y = F.linear(_activation(F.linear(p["x"], p["w1"], p["b1"]), act), p["w2"], p["b2"])
    y.backward(d["g"])
    return y.detach(), {k: v.grad for k, v in p.items()}


def _load_mlp(col, row, d, rank, world):
    with torch.no_grad():
        for param, name in ((col.weight, "w1"), (col.bias, "b1"), (row.weight, "w2")):
            param.copy_(shard(d[name], param.partition_dim, rank, world, param.partition_stride))
        row.bias.copy_(d["b2"])


def _run_mlp(rank, world, act, sp):
    ps = ParallelState.create(tp=world)
    try:
        d = _mlp_data(act)
        stride = 2 if act == "swiglu" else 1
        col = ColumnParallelLinear(H, d["w1"].size(0), tp_group=ps.tp_group, sequence_parallel=sp,
                                   partition_stride=stride)
        row = RowParallelLinear(FFN, H, tp_group=ps.tp_group, sequence_parallel=sp)
        _load_mlp(col, row, d, rank, world)
        x = (_mine(d["x"], 0, rank, world) if sp else d["x"].clone()).requires_grad_()  # [s(/tp), b, h]
        y = row(_activation(col(x), act))
        y.backward(_mine(d["g"], 0, rank, world) if sp else d["g"])
        return dict(y=y.detach(), x=x.grad, w1=col.weight.grad, b1=col.bias.grad, w2=row.weight.grad,
                    b2=row.bias.grad, b2_sp=getattr(row.bias, "sequence_parallel", False))
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_parallel_mlp_matches_dense(run_dist, world, sp, act):
    results = run_dist(world, _run_mlp, act, sp)
    y, grads = _dense_mlp(_mlp_data(act), act)
    stride = 2 if act == "swiglu" else 1
    if sp:
        # Sequence-split output and input grad; the replicated row bias saw only this rank's
        # sequence chunk, so its gradient is the sum over TP (data_parallel/finalize's job).
        _close(unshard([r["y"] for r in results], 0), y)
        _close(unshard([r["x"] for r in results], 0), grads["x"])
        _close(sum(r["b2"] for r in results), grads["b2"])
        assert all(r["b2_sp"] for r in results)
    else:
        for r in results:
            _close(r["y"], y)
            _close(r["x"], grads["x"])
            _close(r["b2"], grads["b2"])
            assert not r["b2_sp"]
    _close(unshard([r["w1"] for r in results], 0, stride), grads["w1"])
    _close(unshard([r["b1"] for r in results], 0, stride), grads["b1"])
    _close(unshard([r["w2"] for r in results], 1), grads["w2"])


def _run_gathered_mlp(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        d = _mlp_data("gelu")
        col = ColumnParallelLinear(H, FFN, tp_group=ps.tp_group, gather_output=True)
        row = RowParallelLinear(FFN, H, tp_group=ps.tp_group, input_is_parallel=False)
        _load_mlp(col, row, d, rank, world)
        x = d["x"].clone().requires_grad_()
        y = row(F.gelu(col(x)))  # col output is the full [s, b, ffn]; row scatters it again
        y.backward(d["g"])
        return dict(y=y.detach(), x=x.grad, w1=col.weight.grad, b1=col.bias.grad, w2=row.weight.grad,
                    b2=row.bias.grad)
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_gather_output_and_unsplit_input(run_dist, world):
    results = run_dist(world, _run_gathered_mlp)
    y, grads = _dense_mlp(_mlp_data("gelu"), "gelu")
    for r in results:
        _close(r["y"], y)
        _close(r["x"], grads["x"])
        _close(r["b2"], grads["b2"])
    _close(unshard([r["w1"] for r in results], 0), grads["w1"])
    _close(unshard([r["b1"] for r in results], 0), grads["b1"])
    _close(unshard([r["w2"] for r in results], 1), grads["w2"])


def _reset_modules(tp_group):
    return {"col": ColumnParallelLinear(H, 2 * FFN, tp_group=tp_group, partition_stride=2),
            "row": RowParallelLinear(FFN, H, tp_group=tp_group),
            "emb": VocabParallelEmbedding(V, H, tp_group=tp_group)}


def _init_weights(modules, tp_rank, tp_size):
    """models/init.py's per-parameter init (the product's only init path), by global name."""
    for name, module in modules.items():
        init_parameter(module.weight, f"{name}.weight", 5, 0.02, 1, tp_rank, tp_size)
    return {name: module.weight.detach().clone() for name, module in modules.items()}


def _run_reset(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        return _init_weights(_reset_modules(ps.tp_group), ps.tp_rank, world)
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_init_is_layout_independent(run_dist, world):
    results = run_dist(world, _run_reset)
    dense = _init_weights(_reset_modules(None), 0, 1)
    for name, dim, stride in (("col", 0, 2), ("row", 1, 1), ("emb", 0, 1)):
        _close(unshard([r[name] for r in results], dim, stride), dense[name])
    assert dense["col"].std().item() == pytest.approx(0.02, rel=0.2)


# ---- (c) vocab-parallel embedding --------------------------------------------------------
_IDS = torch.tensor([[0, 7, 3, 4, 1, 5], [6, 2, 7, 0, 3, 3]])  # [b, s]; every shard hit, 3 repeated


def _run_embedding(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        table, g = _randn(3, (V, H), (2, 6, H))
        emb = VocabParallelEmbedding(V, H, tp_group=ps.tp_group)
        with torch.no_grad():
            emb.weight.copy_(shard(table, 0, rank, world))
        out = emb(_IDS)
        out.backward(g)
        return out.detach(), emb.weight.grad
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_embedding_matches_dense(run_dist, world):
    results = run_dist(world, _run_embedding)
    table, g = _randn(3, (V, H), (2, 6, H))
    table.requires_grad_()
    expected = F.embedding(_IDS, table)
    expected.backward(g)
    for out, _ in results:
        _close(out, expected.detach())
    _close(unshard([grad for _, grad in results], 0), table.grad)


# ---- (d) vocab-parallel cross-entropy ----------------------------------------------------
_TARGET = torch.tensor([[0, 7], [3, 4], [5, 2], [1, 6]])  # [s, b]; targets on every shard


def _ce_data():
    logits, g = _randn(4, (S, B, V), (S, B))
    return logits * 3.0, g


def _dense_ce(logits, alpha, g, target=_TARGET):
    """Smoothed cross-entropy from its definition: target weight 1 - alpha, alpha/(K-1) on
    each other class (Megatron's convention; torch's label_smoothing spreads alpha over all K)."""
    logits = logits.float().clone().requires_grad_()
    logp = logits.log_softmax(-1)  # [s, b, V]
    k = logits.size(-1)
    q = torch.full_like(logp, alpha / (k - 1)).scatter_(-1, target.unsqueeze(-1), 1.0 - alpha)
    loss = -(q * logp).sum(-1)  # [s, b]
    loss.backward(g)
    return loss.detach(), logits.grad


def _run_cross_entropy(rank, world):
    ps = ParallelState.create(tp=world)
    try:
        logits, g = _ce_data()
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            for alpha in (0.0, 0.1):
                local = shard(logits, -1, rank, world).to(dtype).requires_grad_()  # [s, b, V/tp]
                before = local.detach().clone()
                loss = vocab_parallel_cross_entropy(local, _TARGET, ps.tp_group, label_smoothing=alpha)
                loss.backward(g)
                assert torch.equal(local.detach(), before), "logits were modified"
                out[(str(dtype), alpha)] = (loss.detach(), local.grad)
                # spec §11's passes (kept for tools/bench/kernel_ab.py --undo ce), same numbers
                spec = local.detach().clone().requires_grad_()
                spec_loss = _VocabParallelCrossEntropy.apply(spec, _TARGET, ps.tp_group, alpha)
                spec_loss.backward(g)
                out[("spec", str(dtype), alpha)] = (spec_loss.detach(), spec.grad)
        return out
    finally:
        ps.destroy()


def _run_peaked_cross_entropy(rank, world):
    """Logits whose mass sits on one vocabulary shard, 200 nats above the rest, the targets on
    other shards: sum(shard) / sum(all) underflows fp32 there."""
    ps = ParallelState.create(tp=world)
    try:
        logits = torch.zeros(S, B, V)
        logits[..., 0] = 200.0
        target = torch.full((S, B), V - 1)
        out = {}
        for alpha in (0.0, 0.1):
            local = shard(logits, -1, rank, world).requires_grad_()
            loss = vocab_parallel_cross_entropy(local, target, ps.tp_group, label_smoothing=alpha)
            loss.sum().backward()
            out[alpha] = (loss.detach(), local.grad)
        return out
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_cross_entropy_peaked_on_one_shard(run_dist, world):
    results = run_dist(world, _run_peaked_cross_entropy)
    logits = torch.zeros(S, B, V)
    logits[..., 0] = 200.0
    for alpha in (0.0, 0.1):
        loss, grad = _dense_ce(logits, alpha, torch.ones(S, B), torch.full((S, B), V - 1))
        assert torch.isfinite(loss).all() and loss.min() > 190
        for r in results:
            _close(r[alpha][0], loss)
        _close(unshard([r[alpha][1] for r in results], -1), grad)


def test_dense_reference_conventions():
    logits, _ = _ce_data()
    flat, target = logits.view(-1, V), _TARGET.view(-1)
    loss0, _ = _dense_ce(logits, 0.0, torch.ones(S, B))
    _close(loss0.view(-1), F.cross_entropy(flat, target, reduction="none"))
    # torch puts alpha/K on the target too, so its smoothed loss is a different number.
    loss1, _ = _dense_ce(logits, 0.1, torch.ones(S, B))
    torch_ls = F.cross_entropy(flat, target, reduction="none", label_smoothing=0.1)
    assert not torch.allclose(loss1.view(-1), torch_ls, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_cross_entropy_matches_dense(run_dist, world):
    results = run_dist(world, _run_cross_entropy)
    logits, g = _ce_data()
    for dtype in (torch.float32, torch.bfloat16):
        for alpha in (0.0, 0.1):
            # bf16: the dense reference sees the same rounded logits, computed in fp32.
            loss, grad = _dense_ce(logits.to(dtype), alpha, g)
            key = (str(dtype), alpha)
            for r in results:
                assert r[key][0].dtype == torch.float32 and r[key][1].dtype == dtype
                _close(r[key][0], loss, msg=f"loss {key}")
            grad_tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
            _close(unshard([r[key][1] for r in results], -1).float(), grad, **grad_tol)
            for r in results:  # the log-softmax passes against spec §11's, fp32 rounding apart
                spec_loss, spec_grad = r[("spec",) + key]
                torch.testing.assert_close(r[key][0], spec_loss, **TOL_SPEC)
                spec_tol = TOL_SPEC if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)  # bf16 ulp
                torch.testing.assert_close(r[key][1].float(), spec_grad.float(), **spec_tol)


# ---- embedding -> tied output layer -> loss ----------------------------------------------
def _tied_data():
    table, g = _randn(5, (V, H), (S, B))
    return table, g, _IDS[:, :S], _TARGET  # ids [b, s], target [s, b]


def _dense_tied(table, g, ids, target):
    table = table.clone().requires_grad_()
    h = F.embedding(ids, table).transpose(0, 1)  # [s, b, h]
    logits = F.linear(h, table)  # [s, b, V]
    loss = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="none").view(S, B)
    loss.backward(g)
    return loss.detach(), table.grad, logits.detach()


def _run_tied(rank, world, sp):
    ps = ParallelState.create(tp=world)
    try:
        grp = ps.tp_group
        table, g, ids, target = _tied_data()
        emb = VocabParallelEmbedding(V, H, tp_group=grp)
        with torch.no_grad():
            emb.weight.copy_(shard(table, 0, rank, world))
        h = emb(ids).transpose(0, 1)  # [s, b, h]
        if sp:
            h = scatter_to_sequence_parallel_region(h, grp)  # [s/tp, b, h]
        logits = linear_with_tp(h, emb.weight, None, grp, sp)  # [s, b, V/tp]
        loss = vocab_parallel_cross_entropy(logits, target, grp)
        loss.backward(g)
        full = None
        if not sp:
            full = linear_with_tp(h.detach(), emb.weight.detach(), None, grp, False, gather_output=True)
        return loss.detach(), emb.weight.grad, full
    finally:
        ps.destroy()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tied_embedding_head_matches_dense(run_dist, world, sp):
    results = run_dist(world, _run_tied, sp)
    loss, table_grad, logits = _dense_tied(*_tied_data())
    for r_loss, _, full in results:
        _close(r_loss, loss)
        if not sp:
            _close(full, logits)
    # Both uses of the tied table (lookup and output layer) accumulate into one gradient.
    _close(unshard([grad for _, grad, _ in results], 0), table_grad)

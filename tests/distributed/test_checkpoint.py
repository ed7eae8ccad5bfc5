"""Distributed checkpoints reshard: a run saved at one TP/DP layout, with or without the
distributed optimizer, resumes at another with the same next-step loss and parameters;
interrupted saves never become the loaded checkpoint; bad checkpoints are named."""
import os
from dataclasses import replace

import pytest
import torch

from megatron_lite.checkpoint.async_save import AsyncSaver
from megatron_lite.checkpoint.io import (
    CheckpointContext,
    CheckpointTargets,
    SaveOptions,
    load_checkpoint,
    save_checkpoint,
)
from megatron_lite.checkpoint.layout import CheckpointError, read_tracker
from megatron_lite.checkpoint.sharded import build_tp_mesh
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.init import gather_global
from megatron_lite.optimizer.lr_scheduler import OptimizerParamScheduler
from megatron_lite.training.logging import RankLogger
from megatron_lite.training.train_loop import LoopState
from megatron_lite.training.train_step import train_step
from tests.dp_utils import CPU, build_trainable, micro_batches, num_microbatches

ARGS = {"num_layers": 2, "hidden_size": 64}


def _setup(tp, distopt, family):
    ps = ParallelState.create(tp=tp)
    ddp_kw = {"use_distributed_optimizer": distopt}
    model, ddp, opt = build_trainable(ps, ddp_kw, family=family)
    sched = OptimizerParamScheduler(opt, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=0, lr_decay_steps=80,
                                    lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=80)
    ctx = CheckpointContext(build_tp_mesh(ps, "cpu"), ps, CPU, model.rng_tracker, ARGS)
    data = micro_batches(model.config.vocab_size, ps.dp_rank, ps.dp_size)
    return ps, model, ddp, opt, sched, ctx, data


def _step(ddp, opt, sched, data, ps):
    r = train_step(ddp, opt, data, num_microbatches(ps), ps, CPU)
    sched.step(8)
    return (r.loss_sum_count[0] / r.loss_sum_count[1]).item()


def _train_save(rank, world, path, tp, distopt, family):
    ps, model, ddp, opt, sched, ctx, data = _setup(tp, distopt, family)
    for _ in range(2):
        _step(ddp, opt, sched, data, ps)
    save_checkpoint(path, 2, CheckpointTargets([ddp], opt, sched), LoopState(2, 16), ctx)
    losses = [_step(ddp, opt, sched, data, ps) for _ in range(2)]
    ddp.finish_param_sync()
    params = gather_global(model, ps.tp_group)
    ps.destroy()
    return losses, params


def _load_train(rank, world, path, tp, distopt, family):
    ps, model, ddp, opt, sched, ctx, data = _setup(tp, distopt, family)
    loaded = load_checkpoint(path, CheckpointTargets([ddp], opt, sched), ctx, RankLogger(rank, world))
    for _ in range(2 * num_microbatches(ps)):  # the samples the checkpoint already consumed
        next(data)
    losses = [_step(ddp, opt, sched, data, ps) for _ in range(2)]
    ddp.finish_param_sync()
    params = gather_global(model, ps.tp_group)
    ps.destroy()
    return loaded.iteration, loaded.consumed_train_samples, losses, params


@pytest.mark.parametrize("family,save,load", [
    # (world, tp, distributed optimizer)
    ("llama", (2, 2, True), (2, 2, True)),  # same layout: bit for bit
    ("llama", (2, 2, False), (1, 1, False)),
    ("gpt", (2, 1, True), (2, 2, False)),
    ("llama", (1, 1, False), (2, 1, True)),
    ("gpt", (4, 2, True), (4, 1, True)),
])
def test_resume_reshards(run_dist, tmp_path, family, save, load):
    path = str(tmp_path / "ckpt")
    ref_losses, ref_params = run_dist(save[0], _train_save, path, save[1], save[2], family)[0]
    assert read_tracker(path) == (2, False)
    assert sorted(os.listdir(path)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    exact = save == load
    for iteration, consumed, losses, params in run_dist(load[0], _load_train, path, load[1], load[2], family):
        assert (iteration, consumed) == (2, 16)
        assert losses == (ref_losses if exact else pytest.approx(ref_losses, rel=1e-5))
        for name, value in ref_params.items():
            # Another layout sums in another order; Adam can turn a last-bit difference of a
            # near-zero gradient into up to lr of update (see test_data_parallel.py).
            tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 5e-5}
            torch.testing.assert_close(params[name], value, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _load_only(rank, world, path, args=None):
    ps, model, ddp, opt, sched, ctx, data = _setup(1, False, "gpt")
    try:
        loaded = load_checkpoint(path, CheckpointTargets([ddp], opt, sched), replace(ctx, args=args or ARGS),
                                 RankLogger(rank, world))
        return None if loaded is None else loaded.iteration
    except CheckpointError as e:
        return str(e)
    finally:
        ps.destroy()


def test_truncated_files_are_named(run_dist, tmp_path):
    root = tmp_path / "ckpt"
    run_dist(1, _train_save, str(root), 1, False, "gpt")
    directory = root / "iter_0000002"
    tensors = max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    msg = run_dist(1, _load_only, str(root))[0]
    assert msg.startswith(f"{directory}: truncated checkpoint: {tensors} has {len(data) // 2} bytes, "
                          f"expected {len(data)}"), msg
    tensors.write_bytes(data)
    common = directory / "common.json"
    common.write_text(common.read_text()[:50])
    msg = run_dist(1, _load_only, str(root))[0]
    assert msg.startswith(f"{common}: cannot read (JSONDecodeError"), msg


def test_missing_partial_and_bad_checkpoints(run_dist, tmp_path):
    root = tmp_path / "ckpt"
    assert run_dist(1, _load_only, str(root)) == [None]  # nothing there: start from scratch
    run_dist(1, _train_save, str(root), 1, False, "gpt")
    # An interrupted later save leaves only a .partial directory: the tracker still says 2.
    (root / "iter_0000004.partial").mkdir()
    assert run_dist(1, _load_only, str(root))[0] == 2
    msg = run_dist(1, _load_only, str(root), {"num_layers": 3})[0]
    assert "num_layers is 2 in the checkpoint but 3 on the command line" in msg
    (root / "iter_0000002" / "metadata.json").unlink()
    assert "metadata.json is missing" in run_dist(1, _load_only, str(root))[0]
    (root / "latest_checkpointed_iteration.txt").write_text("banana")
    assert "expected an iteration number" in run_dist(1, _load_only, str(root))[0]


def _async_snapshot(rank, world, path):
    """Save in the background, then keep changing the weights and optimizer state right away:
    the checkpoint must hold the values of the moment the save was called."""
    ps, model, ddp, opt, sched, ctx, data = _setup(2, True, "llama")
    _step(ddp, opt, sched, data, ps)
    before = gather_global(model, ps.tp_group)
    saver = AsyncSaver(CPU)
    save_checkpoint(path, 1, CheckpointTargets([ddp], opt, sched), LoopState(1, 8), ctx,
                    SaveOptions(saver=saver))
    unpublished = read_tracker(path)
    for p in model.parameters():
        p.data.add_(1.0)
    _step(ddp, opt, sched, data, ps)
    result = saver.close()
    ps.destroy()
    ps, model, ddp, opt, sched, ctx, data = _setup(2, True, "llama")
    load_checkpoint(path, CheckpointTargets([ddp], opt, sched), ctx, RankLogger(rank, world))
    loaded = gather_global(model, ps.tp_group)
    ps.destroy()
    return unpublished, result.iteration, read_tracker(path), before, loaded


def test_async_save_is_a_snapshot_published_after_the_write(run_dist, tmp_path):
    path = str(tmp_path / "ckpt")
    for unpublished, iteration, tracker, before, loaded in run_dist(2, _async_snapshot, path):
        assert unpublished is None  # the tracker waits for the background write
        assert (iteration, tracker) == (1, (1, False))
        for name, value in before.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def _bytes_per_rank(directory) -> list[int]:
    sizes = [0, 0]
    for name in os.listdir(directory):
        if name.endswith(".distcp"):  # __{rank}_{writer thread}.distcp
            sizes[int(name[2:].split("_")[0])] += os.path.getsize(os.path.join(directory, name))
    return sizes


def _save_both_ways(rank, world, path):
    ps, model, ddp, opt, sched, ctx, data = _setup(1, False, "gpt")
    _step(ddp, opt, sched, data, ps)
    for fully_parallel in (True, False):
        save_checkpoint(os.path.join(path, str(fully_parallel)), 1, CheckpointTargets([ddp], opt, sched),
                        LoopState(1, 8), ctx, SaveOptions(fully_parallel=fully_parallel))
    ps.destroy()


def test_fully_parallel_save_spreads_replicas_over_dp(run_dist, tmp_path):
    """DP2: every tensor is replicated. By default the two ranks write about half each;
    --no-ckpt-fully-parallel-save leaves (nearly) everything to rank 0."""
    run_dist(2, _save_both_ways, str(tmp_path))
    spread, lowest = (_bytes_per_rank(tmp_path / way / "iter_0000001") for way in ("True", "False"))
    assert sum(spread) == pytest.approx(sum(lowest), rel=0.05)
    assert min(spread) > 0.3 * sum(spread), spread
    assert lowest[1] < 0.05 * sum(lowest), lowest


def _failing_saves(rank, world, path):
    ps, model, ddp, opt, sched, ctx, data = _setup(1, False, "gpt")
    _step(ddp, opt, sched, data, ps)
    save_checkpoint(path, 1, CheckpointTargets([ddp], opt, sched), LoopState(1, 8), ctx)
    messages = []
    for iteration, saver in ((2, None), (3, AsyncSaver(CPU))):
        # A file where the save's directory must go: the write fails like on a full or read-only disk.
        open(os.path.join(path, f"iter_{iteration:07d}.partial"), "w").close()
        try:
            save_checkpoint(path, iteration, CheckpointTargets([ddp], opt, sched), LoopState(iteration, 8),
                            ctx, SaveOptions(saver=saver))
            if saver is not None:
                saver.close()
        except CheckpointError as e:
            messages.append(str(e))
    ps.destroy()
    return messages, read_tracker(path)


def test_failed_saves_keep_the_previous_checkpoint(run_dist, tmp_path):
    path = str(tmp_path / "ckpt")
    messages, tracker = run_dist(1, _failing_saves, path)[0]
    assert tracker == (1, False)
    assert messages[0].startswith(f"{path}/iter_0000002.partial: save of iteration 2 failed (")
    assert messages[1].startswith(f"{path}/iter_0000003.partial: background save of iteration 3 failed (")
    assert all(m.endswith("the previous checkpoint is still the latest") for m in messages)
    assert sorted(os.listdir(path)) == ["iter_0000001", "iter_0000002.partial", "iter_0000003.partial",
                                        "latest_checkpointed_iteration.txt"]

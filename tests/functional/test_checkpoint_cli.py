"""Checkpoints through torchrun on CPU (spec §4): exact resume (same log lines, bit for bit),
resume after SIGKILL from the last complete checkpoint, and resharding across layouts."""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.functional.test_pretrain_cli import ROOT, iteration_lines, resumed_loss, torchrun

# A GPT with dropout on, so the RNG state is part of what has to be restored exactly.
TINY_GPT = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "8",
    "--lr", "3e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--mock-data", "--log-interval", "1", "--distributed-backend", "gloo", "--seed", "1234",
    "--eval-iters", "0",
]


def _rows(stdout):
    # iteration -> (lr, lm loss, grad norm) exactly as printed
    return {int(r[0]): (r[3], r[5], r[6]) for r in iteration_lines(stdout)}


def _assert_resumed(resumed, uninterrupted):
    """The lines of a resumed run equal the uninterrupted run's, except that the loss of its
    second line averages its first two iterations (spec §3.2 'Cadence'; `resumed_loss`)."""
    first = min(resumed)
    losses = {it: row[1] for it, row in uninterrupted.items()}
    for it, (lr, loss, norm) in resumed.items():
        assert (lr, norm) == uninterrupted[it][::2], it
        if it == first + 1:
            assert float(loss) == pytest.approx(resumed_loss(losses, first, it), rel=2e-6), it
        else:
            assert loss == uninterrupted[it][1], it


@pytest.fixture(scope="module")
def uninterrupted():
    return _rows(torchrun(1, "pretrain_gpt.py", *TINY_GPT).stdout)


def test_resume_prints_the_same_lines(tmp_path, uninterrupted):
    ckpt = str(tmp_path / "ckpt")
    first = torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--save", ckpt, "--save-interval", "4",
                     "--exit-interval", "4").stdout
    # spec §3.7 (HEAD): both lines carry the timestamp; the saved line lists t, gtp_remat, p.
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\]"
    assert re.search(rf"^{stamp} saving checkpoint at iteration       4 to {re.escape(ckpt)} in torch_dist "
                     "format$", first, re.M)
    assert re.search(rf"^  {stamp} successfully saved checkpoint from iteration       4 to {re.escape(ckpt)} "
                     r"\[ t 1/1, gtp_remat 1/1, p 1/1 \]$", first, re.M)
    second = torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--save", ckpt, "--save-interval", "4",
                      "--load", ckpt).stdout
    assert " loading distributed checkpoint from" in second and "at iteration 4" in second
    resumed = _rows(second)
    assert sorted(resumed) == [5, 6, 7, 8]
    _assert_resumed(resumed, uninterrupted)
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "8"


@pytest.mark.parametrize("kill_after,extra", [
    (" iteration        5/", []),  # between two saves
    ("saving checkpoint at iteration       6", []),  # while rank 0 writes iteration 6
    ("  scheduled an async checkpoint save at iteration       6", ["--async-save"]),  # background write
], ids=["between-saves", "during-save", "during-async-save"])
def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted, kill_after, extra):
    ckpt = str(tmp_path / "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # Same schedule as the uninterrupted 8-iteration run, with iterations to spare.
    flags = [*TINY_GPT, "--train-iters", "100", "--lr-decay-iters", "8"]
    # The training process itself (a world of one without torchrun), so SIGKILL reaches it:
    # torchrun cannot forward SIGKILL and would leave its worker running.
    cmd = [sys.executable, str(ROOT / "pretrain_gpt.py"), *flags, "--save", ckpt, "--save-interval", "2",
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if kill_after in line:
            if "6" in kill_after:  # wait for the first tensor file of iteration 6 to be open
                deadline = time.time() + 30
                while not glob.glob(os.path.join(ckpt, "iter_0000006.partial", "*.distcp")) \
                        and time.time() < deadline:
                    time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    tracker = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    # Saves happen every 2 iterations; whichever was the last to complete is the one named.
    assert tracker in (4, 6)
    if "6" in kill_after:  # killed with iteration 6 half written: its files are left unpublished
        assert tracker == 4 and os.path.isdir(os.path.join(ckpt, "iter_0000006.partial"))
    assert all(name.startswith("iter_") and int(name[5:12]) <= tracker or name.endswith(".partial")
               or name == "latest_checkpointed_iteration.txt" for name in os.listdir(ckpt))
    resumed = _rows(torchrun(1, "pretrain_gpt.py", *flags, "--load", ckpt, "--exit-interval",
                             str(tracker + 2)).stdout)
    assert sorted(resumed) == [tracker + 1, tracker + 2]
    _assert_resumed(resumed, uninterrupted)


def _assert_rows_close(rows, ref_rows, iterations):
    assert sorted(rows) == iterations
    losses = {it: row[1] for it, row in ref_rows.items()}
    for it, (lr, loss, norm) in rows.items():
        assert lr == ref_rows[it][0], it
        assert float(loss) == pytest.approx(resumed_loss(losses, iterations[0], it), rel=1e-5), it
        assert float(norm) == pytest.approx(float(ref_rows[it][2]), rel=1e-3), it


def _stored(directory, tmp_path):
    """Every tensor of a checkpoint under its global key (rank-local RNG states left out)."""
    target = tmp_path / (os.path.basename(directory) + f"-{len(os.listdir(tmp_path))}.pt")
    dcp_to_torch_save(directory, target)
    return {k: v for k, v in torch.load(target, weights_only=True).items() if not k.startswith("rng.")}


def _assert_state_close(state, ref):
    assert sorted(state) == sorted(ref)
    for key, value in ref.items():
        error = (state[key].double() - value.double()).norm() / value.double().norm().clamp(min=1e-12)
        assert error < 1e-4, (key, error.item())


def test_reshard_tp2_pp2_distopt_to_pp4_and_dp2_and_back(tmp_path):
    """spec §4.3: saved at TP2xPP2 with the distributed optimizer, loaded at TP1xPP4 and at DP2
    (plain optimizer): the same next losses and, 4 steps on, the same weights and optimizer
    state; then each of those checkpoints loads back into TP2xPP2 + distributed optimizer."""
    flags = [*TINY_GPT, "--hidden-dropout", "0", "--attention-dropout", "0"]
    source = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
              "--use-distributed-optimizer"]
    ref_dir = str(tmp_path / "tp2pp2")
    ref_rows = _rows(torchrun(4, "pretrain_gpt.py", *flags, *source, "--save", ref_dir,
                              "--save-interval", "4").stdout)
    ref_state = _stored(os.path.join(ref_dir, "iter_0000008"), tmp_path)
    for name, nproc, layout in (("pp4", 4, ["--pipeline-model-parallel-size", "4"]), ("dp2", 2, [])):
        out_dir = str(tmp_path / name)
        rows = _rows(torchrun(nproc, "pretrain_gpt.py", *flags, *layout, "--load", ref_dir,
                              "--ckpt-step", "4", "--save", out_dir, "--save-interval", "2").stdout)
        _assert_rows_close(rows, ref_rows, [5, 6, 7, 8])
        _assert_state_close(_stored(os.path.join(out_dir, "iter_0000008"), tmp_path), ref_state)
        back = _rows(torchrun(4, "pretrain_gpt.py", *flags, *source, "--load", out_dir,
                              "--ckpt-step", "6").stdout)
        _assert_rows_close(back, ref_rows, [7, 8])


def test_async_save_and_checkpoint_args(tmp_path, uninterrupted):
    """--async-save: training prints the lines of a run without saves, every save is published
    (tracker last), --save-retain-interval prunes, and a checkpoint written in the background
    while training went on resumes exactly, here with the model shape taken from it
    (--use-checkpoint-args)."""
    ckpt = str(tmp_path / "ckpt")
    first = torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--save", ckpt, "--save-interval", "2", "--async-save",
                     "--save-retain-interval", "4").stdout
    assert _rows(first) == uninterrupted
    for it in (2, 4, 6, 8):
        assert f"  scheduled an async checkpoint save at iteration {it:7d} to {ckpt}" in first
        assert f"] successfully saved checkpoint from iteration {it:7d} to {ckpt}" in first
    assert sorted(os.listdir(ckpt)) == ["iter_0000004", "iter_0000008", "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "8"
    shape = {"--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
             "--max-position-embeddings", "--vocab-size", "--make-vocab-size-divisible-by"}
    flags = [f for i, f in enumerate(TINY_GPT) if f not in shape and TINY_GPT[i - 1] not in shape]
    second = torchrun(1, "pretrain_gpt.py", *flags, "--use-checkpoint-args", "--load", ckpt,
                      "--ckpt-step", "4").stdout
    assert " using the checkpoint's arguments: " in second
    resumed = _rows(second)
    assert sorted(resumed) == [5, 6, 7, 8]
    _assert_resumed(resumed, uninterrupted)


def test_override_ckpt_iteration(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--save", ckpt, "--save-interval", "2", "--exit-interval", "2")
    out = torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--load", ckpt, "--override-ckpt-iteration", "6").stdout
    rows = iteration_lines(out)
    # Iterations 7 and 8 only, with consumed samples continuing from 6 x 8.
    assert [(int(r[0]), int(r[2])) for r in rows] == [(7, 56), (8, 64)]

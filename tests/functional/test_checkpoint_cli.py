"""Checkpoints through torchrun on CPU (spec §4): exact resume (same log lines, bit for bit),
resume after SIGKILL from the last complete checkpoint, and resharding across layouts."""
import os
import signal
import subprocess
import sys

import pytest

from tests.functional.test_pretrain_cli import ITERATION_LINE, ROOT, iteration_lines, torchrun

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


@pytest.fixture(scope="module")
def uninterrupted():
    return _rows(torchrun(1, "pretrain_gpt.py", *TINY_GPT).stdout)


def test_resume_prints_the_same_lines(tmp_path, uninterrupted):
    ckpt = str(tmp_path / "ckpt")
    first = torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--save", ckpt, "--save-interval", "4",
                     "--exit-interval", "4").stdout
    assert "saving checkpoint at iteration       4 to" in first
    assert "  successfully saved checkpoint from iteration       4 to" in first
    second = torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--save", ckpt, "--save-interval", "4",
                      "--load", ckpt).stdout
    assert " loading distributed checkpoint from" in second and "at iteration 4" in second
    resumed = _rows(second)
    assert sorted(resumed) == [5, 6, 7, 8]
    for it in resumed:
        assert resumed[it] == uninterrupted[it], it
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "8"


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
    ckpt = str(tmp_path / "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # The training process itself (a world of one without torchrun), so SIGKILL reaches it:
    # torchrun cannot forward SIGKILL and would leave its worker running.
    cmd = [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY_GPT, "--train-iters", "100", "--save", ckpt,
           "--save-interval", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if ITERATION_LINE.match(line.rstrip("\n")) and " iteration        5/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    tracker = int(open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read())
    # Saves happen every 2 iterations; whichever was the last to complete is the one named.
    assert tracker >= 4 and tracker % 2 == 0
    assert all(name.startswith("iter_") and int(name[5:12]) <= tracker or name.endswith(".partial")
               or name == "latest_checkpointed_iteration.txt" for name in os.listdir(ckpt))
    stop = str(tracker + 2)
    resumed = _rows(torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--train-iters", "100", "--load", ckpt,
                             "--exit-interval", stop).stdout)
    ref = _rows(torchrun(1, "pretrain_gpt.py", *TINY_GPT, "--train-iters", "100",
                         "--exit-interval", stop).stdout)
    assert sorted(resumed) == [tracker + 1, tracker + 2]
    for it in resumed:
        assert resumed[it] == ref[it], it


def test_reshard_tp2_pp2_distopt_to_dp2(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    flags = [*TINY_GPT, "--hidden-dropout", "0", "--attention-dropout", "0"]
    ref = torchrun(4, "pretrain_gpt.py", *flags, "--tensor-model-parallel-size", "2",
                   "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save", ckpt,
                   "--save-interval", "4").stdout
    ref_rows = _rows(ref)
    out = torchrun(2, "pretrain_gpt.py", *flags, "--use-distributed-optimizer", "--load", ckpt,
                   "--ckpt-step", "4").stdout
    rows = _rows(out)
    assert sorted(rows) == [5, 6, 7, 8]
    for it, (lr, loss, norm) in rows.items():
        assert lr == ref_rows[it][0]
        assert float(loss) == pytest.approx(float(ref_rows[it][1]), rel=1e-5)
        assert float(norm) == pytest.approx(float(ref_rows[it][2]), rel=1e-3)

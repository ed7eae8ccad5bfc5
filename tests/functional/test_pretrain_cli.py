"""End to end through torchrun on CPU: the same command at TP=1 and TP=2 (with and without
sequence parallelism) prints the same `lm loss` values, and bad layouts fail at once."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY_LLAMA = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
    "--lr", "3e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--mock-data", "--log-interval", "2", "--distributed-backend", "gloo", "--seed", "1234",
    "--eval-interval", "3", "--eval-iters", "1",
]

ITERATION_LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration +(\d+)/ +(\d+) \| "
    r"consumed samples: +(\d+) \| elapsed time per iteration \(ms\): [\d.]+ \| "
    r"(?:throughput per GPU \(TFLOP/s/GPU\): [\d.]+ \| )?"
    r"learning rate: (\d\.\d{6}E[+-]\d\d) \| global batch size: +(\d+) \| "
    r"lm loss: (\d\.\d{6}E[+-]\d\d) \| loss scale: 1\.0 \| grad norm: ([\d.]+) \| "
    r"number of skipped iterations: +0 \| number of nan iterations: +0 \|$")


def resumed_loss(reference: dict, first: int, it: int) -> float:
    """The lm loss that a run whose first iteration is `first` prints at iteration `it` with
    --log-interval 1, from the per-iteration losses of an uninterrupted run (`reference`: it ->
    loss, iterations >= 3 printed alone there). spec §3.2 'Cadence': the first line of a run
    resets nothing, so the line after it averages both iterations."""
    if it == first + 1:
        return (float(reference[first]) + float(reference[it])) / 2
    return float(reference[it])


def torchrun(nproc: int, script: str, *flags: str, check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def iteration_lines(stdout: str):
    rows = [ITERATION_LINE.match(line) for line in stdout.splitlines() if line.startswith(" [")]
    assert rows and all(rows), stdout[-2000:]
    return [m.groups() for m in rows]


@pytest.fixture(scope="module")
def tp1_lines():
    return iteration_lines(torchrun(1, "pretrain_llama.py", *TINY_LLAMA).stdout)


def test_iteration_lines_follow_the_template(tp1_lines):
    # First iteration always printed, then every --log-interval (spec §3.2).
    assert [(it, total, consumed) for it, total, consumed, *_ in tp1_lines] == [
        ("1", "6", "4"), ("2", "6", "8"), ("4", "6", "16"), ("6", "6", "24")]
    losses = [float(row[5]) for row in tp1_lines]
    assert losses[-1] < losses[0]  # the mock data is learnable


@pytest.mark.parametrize("extra", [["--tensor-model-parallel-size", "2"],
                                   ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                   ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                    "--tp-comm-overlap"],
                                   ["--tensor-model-parallel-size", "1"],  # DP = 2
                                   ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                    "--overlap-param-gather", "--ddp-bucket-size", "10000"]],
                         ids=["tp2", "tp2-sp", "tp2-sp-overlap", "dp2", "dp2-distopt-overlap"])
def test_two_processes_print_the_same_losses(tp1_lines, extra):
    lines = iteration_lines(torchrun(2, "pretrain_llama.py", *TINY_LLAMA, *extra).stdout)
    # lm loss and learning rate identical to the printed precision; grad norm to 3 decimals.
    assert [(r[0], r[3], r[5]) for r in lines] == [(r[0], r[3], r[5]) for r in tp1_lines]
    for a, b in zip(lines, tp1_lines):
        assert abs(float(a[6]) - float(b[6])) <= 2e-3


def test_bad_layout_fails_with_one_line_naming_the_flags():
    proc = torchrun(2, "pretrain_gpt.py", *TINY_LLAMA, "--tensor-model-parallel-size", "3", check=False)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "--tensor-model-parallel-size" in err and "world size (2)" in err, err[-2000:]

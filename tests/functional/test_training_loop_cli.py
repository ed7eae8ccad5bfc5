"""Training-loop behaviour through torchrun on CPU: validation/test blocks (spec §3.6),
tensorboard scalars read back with tensorboard's own EventAccumulator (spec §3.8), exits
(--exit-interval, SIGTERM with --exit-signal-handler)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.functional.test_pretrain_cli import ITERATION_LINE, ROOT, TINY_LLAMA, iteration_lines, torchrun

VALIDATION = re.compile(r"^ validation loss at (iteration \d+(?: on (?:validation|test) set)?) \| "
                        r"lm loss value: (\d\.\d{6}E[+-]\d\d) \| lm loss PPL: (\d\.\d{6}E[+-]\d\d) \| $")


def _flags(**overrides):
    flags = list(TINY_LLAMA)
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if flag in flags:
            i = flags.index(flag)
            flags[i + 1] = str(value)
        else:
            flags += [flag, str(value)] if value is not True else [flag]
    return flags


def test_validation_blocks_and_tensorboard(tmp_path):
    tb = tmp_path / "tb"
    out = torchrun(1, "pretrain_llama.py", *_flags(tensorboard_dir=str(tb), log_throughput=True,
                                                    log_validation_ppl_to_tensorboard=True,
                                                    timing_log_level=1)).stdout
    lines = out.splitlines()
    # spec §3.3: after each iteration line, the level-1 timers, min/max over ranks
    headers = [i for i, line in enumerate(lines) if line == "(min, max) time across ranks (ms):"]
    assert len(headers) == len(iteration_lines(out))
    timer_line = re.compile(r"^    (\S+) \.+: \((\d+\.\d\d), (\d+\.\d\d)\)$")
    block = [timer_line.match(line) for line in lines[headers[-1] + 1:headers[-1] + 4]]
    assert [m.group(1) for m in block] == ["forward-backward", "all-grads-sync", "optimizer"]
    assert all(len(lines[headers[-1] + 1 + k].split(":")[0]) == 4 + 48 for k in range(3))
    blocks = [(i, VALIDATION.match(line)) for i, line in enumerate(lines) if "validation loss at" in line]
    assert [m.group(1) for _, m in blocks] == ["iteration 3", "iteration 6", "iteration 6 on validation set",
                                               "iteration 6 on test set"]
    for i, m in blocks:  # dash lines are one longer than the middle line (spec §3.6)
        assert lines[i - 1] == lines[i + 1] == "-" * (len(lines[i]) + 1)
        assert float(m.group(3)) == pytest.approx(2.718281828 ** float(m.group(2)), rel=1e-5)
    assert all("throughput per GPU (TFLOP/s/GPU):" in line for line in lines if ITERATION_LINE.match(line))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm", "lm loss validation",
                "lm loss validation ppl"):
        assert tag in tags and f"{tag} vs samples" in tags, tag
    loss = [e.value for e in acc.Scalars("lm loss")]
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3, 4, 5, 6]
    printed = {int(r[0]): float(r[5]) for r in iteration_lines(out)}
    assert loss[0] == pytest.approx(printed[1], rel=1e-6)  # iteration 1 is printed alone
    assert [e.step for e in acc.Scalars("lm loss vs samples")] == [4, 8, 12, 16, 20, 24]
    valid = {e.step: e.value for e in acc.Scalars("lm loss validation")}
    assert valid[3] == pytest.approx(float(blocks[0][1].group(2)), rel=1e-6)


def test_exit_interval_stops_at_that_iteration():
    out = torchrun(1, "pretrain_llama.py", *_flags(exit_interval=4, log_interval=1)).stdout
    assert [int(r[0]) for r in iteration_lines(out)] == [1, 2, 3, 4]
    assert "exiting program at iteration 4" in out


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_sigterm_finishes_the_step_and_exits_cleanly():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "pretrain_llama.py"),
           *_flags(train_iters=100000, log_interval=1, exit_signal_handler=True, eval_iters=0)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    seen, deadline = [], time.time() + 120
    for line in proc.stdout:
        seen.append(line)
        if ITERATION_LINE.match(line.rstrip("\n")) and " iteration        3/" in line:
            # SIGTERM to the training processes (what a scheduler's preemption notice reaches);
            # torchrun then sees its workers exit cleanly.
            for child in _children(proc.pid):
                os.kill(child, signal.SIGTERM)
            break
        assert time.time() < deadline, "no iteration 3 within 120 s"
    rest, _ = proc.communicate(timeout=120)
    text = "".join(seen) + rest
    iterations = [int(r[0]) for r in iteration_lines(text)]
    assert "exiting program after receiving SIGTERM." in text, text[-2000:]
    assert iterations[-1] <= 5  # stopped within a couple of iterations of the signal
    assert not re.search(r"^\[rank\d\]:", text, re.M), text[-3000:]
    assert proc.returncode == 0


STATS = re.compile(r" grad norm: ([\d.]+) \| num zeros: (\d+\.0) \| params norm: ([\d.]+) \| "
                   r"number of skipped iterations")


def test_num_zeros_and_params_norm_agree_across_layouts(tmp_path):
    """--log-num-zeros-in-grad / --log-params-norm (spec §3.2, §7.3): the values are global, so
    TP2 and DP2 with the distributed optimizer print those of one process; tensorboard gets
    `num-zeros` and `params-norm`. With --decoupled-lr the embedding/output group's LR is
    printed after the LR and its updates agree across layouts too."""
    flags = _flags(log_num_zeros_in_grad=True, log_params_norm=True, log_interval=1, eval_iters=0,
                   decoupled_lr=1e-2, decoupled_min_lr=1e-3)
    tb = tmp_path / "tb"
    runs = {
        "tp1": torchrun(1, "pretrain_llama.py", *flags, "--tensorboard-dir", str(tb)).stdout,
        "tp2": torchrun(2, "pretrain_llama.py", *flags, "--tensor-model-parallel-size", "2").stdout,
        "dp2": torchrun(2, "pretrain_llama.py", *flags, "--use-distributed-optimizer").stdout,
    }
    stats = {name: [STATS.search(line).groups() for line in out.splitlines() if " iteration " in line
                    and "consumed samples" in line] for name, out in runs.items()}
    ref = stats["tp1"]
    assert len(ref) == 6
    # Embedding rows of ids that no sample contains get exactly zero gradient.
    assert all(float(zeros) > 0 for _, zeros, _ in ref)
    for name in ("tp2", "dp2"):
        assert [z for _, z, _ in stats[name]] == [z for _, z, _ in ref], name
        for (_, _, norm), (_, _, ref_norm) in zip(stats[name], ref):
            assert float(norm) == pytest.approx(float(ref_norm), abs=1.5e-3), name
    for name, out in runs.items():
        lines = [line for line in out.splitlines() if " iteration " in line and "consumed samples" in line]
        lrs = [re.search(r" learning rate: (\S+) \| decoupled learning rate: (\S+) \|", line).groups()
               for line in lines]
        # Warmup over 2 iterations, then cosine to the minimum at iteration 6 (TINY_LLAMA).
        assert [d for _, d in lrs][:2] == ["5.000000E-03", "1.000000E-02"], name
        assert lrs[-1] == ("0.000000E+00", "1.000000E-03"), name
        losses = [re.search(r" lm loss: (\S+) \|", line).group(1) for line in lines]
        assert [float(x) for x in losses] == pytest.approx([float(x) for x in re.findall(
            r" lm loss: (\S+) \|", runs["tp1"])], rel=1e-5), name
    norms = [float(n) for _, _, n in ref]
    assert norms[0] != norms[-1]  # the params change, and so does their norm

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.value for e in acc.Scalars("num-zeros")] == [float(z) for _, z, _ in ref]
    assert [round(e.value, 3) for e in acc.Scalars("params-norm")] == pytest.approx(norms, abs=1e-3)


def test_profiler_gc_and_determinism_flags_leave_training_unchanged(tmp_path):
    """--use-pytorch-profiler writes a trace of exactly the steps [start, end) to
    --tensorboard-dir; manual GC, cache emptying and deterministic mode change no printed value."""
    flags = _flags(eval_iters=0, log_interval=1)
    plain = iteration_lines(torchrun(1, "pretrain_llama.py", *flags).stdout)
    tb = tmp_path / "tb"
    extra = ["--profile", "--use-pytorch-profiler", "--profile-step-start", "3", "--profile-step-end", "5",
             "--tensorboard-dir", str(tb), "--manual-gc", "--manual-gc-interval", "2",
             "--empty-unused-memory-level", "2", "--deterministic-mode"]
    out = torchrun(1, "pretrain_llama.py", *flags, *extra).stdout
    values = [(r[0], r[3], r[5], r[6]) for r in iteration_lines(out)]
    assert values == [(r[0], r[3], r[5], r[6]) for r in plain]
    traces = list(tb.rglob("*.pt.trace.json"))
    assert len(traces) == 1, list(tb.rglob("*"))
    import json

    steps = {e["name"] for e in json.loads(traces[0].read_text())["traceEvents"]
             if str(e.get("name", "")).startswith("ProfilerStep#")}
    assert len(steps) == 2, steps  # iterations 3 and 4

"""tools/bench/kernel_ab.py's interleaved runs: the order of the runs and the summary lines."""
import json
import subprocess

from tools.bench import kernel_ab


def test_runs_interleave_each_choice_per_round_in_fresh_processes(monkeypatch):
    calls = []

    def fake_run(cmd, capture_output, text):
        choice = cmd[cmd.index("--undo") + 1]
        calls.append((choice, cmd[cmd.index("--") + 1:]))
        step = {"none": 100.0, "swiglu": 104.0}.get(choice, 0.0) + len(calls)
        out = "warming up\n" + json.dumps({"step_ms": step, "tflops_per_gpu": 1e5 / step})
        return subprocess.CompletedProcess(cmd, 0, stdout=out if choice != "rmsnorm" else "", stderr="oom")

    monkeypatch.setattr(kernel_ab.subprocess, "run", fake_run)
    runs = kernel_ab.interleaved(["none", "swiglu", "rmsnorm"], 2, ["--preset", "llama-1b"])
    assert [c for c, _ in calls] == ["none", "swiglu", "rmsnorm"] * 2
    assert all(rest == ["--preset", "llama-1b"] for _, rest in calls)
    assert [r["step_ms"] if r else None for _, r in runs] == [101.0, 106.0, None, 104.0, 109.0, None]
    lines = kernel_ab.summary(runs)
    assert lines[0].startswith("--undo none      2 runs  step 102.50 ms (101.00-104.00)")
    assert lines[0].endswith("1.0000x vs --undo none")
    assert lines[1].startswith("--undo swiglu    2 runs  step 107.50 ms (106.00-109.00)")
    assert lines[1].endswith(f"{102.5 / 107.5:.4f}x vs --undo none")
    assert lines[2] == "--undo rmsnorm   no result"

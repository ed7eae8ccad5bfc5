"""End to end through torchrun on CPU: MegatronDPP's launch flags (`--use-dpp --node-ips ...
--workload 1048576 --num-gpus 2`) on `pretrain_gpt.py` train with the dynamic pipeline and print
exactly the static schedule's loss lines, with one warning about the transport flags and a
trace that the stats tool reads; and tools/pipeline_dpp_bench.py runs its three modes."""
import json
import re

from tests.functional.test_pipeline_cli import TINY_GPT, _losses
from tests.functional.test_pretrain_cli import torchrun

PIPELINE = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
DPP = ["--use-dpp", "--node-ips", "127.0.0.1,127.0.0.1", "--workload", str(2048 * 512), "--num-gpus", "2"]


def test_megatron_dpp_flags_train_with_the_static_losses(tmp_path):
    static = _losses(torchrun(2, "pretrain_gpt.py", *TINY_GPT, *PIPELINE).stdout)
    trace_file = tmp_path / "dpp.json"
    proc = torchrun(2, "pretrain_gpt.py", *TINY_GPT, *PIPELINE, *DPP, "--pipeline-trace-file",
                    str(trace_file))
    dynamic = _losses(proc.stdout)
    assert len(static) == 6 and dynamic == static, proc.stdout[-3000:]  # bit-identical gradients
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if "--workload" in line and "MegatronDPP" in line]
    assert len(warnings) == 1, output[-3000:]  # one line, from rank 0
    assert "--node-ips" in warnings[0] and "--num-gpus" in warnings[0]
    stats = torchrun(1, "tools/pipeline_trace_stats.py", str(trace_file)).stdout
    assert re.search(r"order: (dynamic|the static schedule) \(\d+ of 6 rank-steps", stats), stats
    assert "dynamic breadth-first" in stats


def test_dpp_benchmark_tool_runs_its_modes(tmp_path):
    out = tmp_path / "bench.jsonl"
    torchrun(2, "tools/pipeline_dpp_bench.py", "--preset", "tiny", "--num-layers", "4", "--seq-length", "32",
             "--micro-batch-size", "2", "--micro-batches", "4", "--steps", "2", "--warmup", "1",
             "--slow-stage", "1", "--stall-prob", "0.1", "--trace-dir", str(tmp_path), "--json", str(out),
             "--modes", "static,breadth-first,depth-first@1")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["static", "breadth-first", "depth-first@1"]
    assert rows[0]["steps_out_of_static_order"] == "0/4" and all(r["ms_per_iteration"] > 0 for r in rows)
    assert (tmp_path / "breadth-first.json").exists()

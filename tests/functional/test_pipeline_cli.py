"""End to end through torchrun on CPU: interleaved pipeline parallelism with tensor parallelism
(PP=2 x VPP=2 x TP=2 on 4 processes) prints the same losses as one process, writes a Chrome
trace, and an impossible schedule fails at start naming the flags (spec §6.2); a
--pipeline-model-parallel-layout split prints the same losses too."""
import json
import re

from tests.functional.test_pretrain_cli import torchrun

TINY_GPT = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",
    "--lr", "3e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
    "--attention-dropout", "0", "--hidden-dropout", "0",  # dropout streams are seeded per stage
    "--mock-data", "--log-interval", "1", "--eval-iters", "1", "--distributed-backend", "gloo",
    "--seed", "1234",
]
PIPELINE = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
            "--tensor-model-parallel-size", "2"]

LOSS = re.compile(r"(iteration +\d+/ +\d+ .*learning rate: \S+ .*)lm loss: (\S+) \|"
                  r"|(validation loss at .*)lm loss value: (\S+) \|")


def _losses(stdout):
    rows = []
    for line in stdout.splitlines():
        m = LOSS.search(line)
        if m:
            head = (m.group(1) or m.group(3))
            rows.append((re.sub(r"elapsed time per iteration \(ms\): \S+ \|", "", head),
                         float(m.group(2) or m.group(4))))
    return rows


def test_interleaved_pipeline_with_tp_prints_the_single_process_losses(tmp_path):
    single = _losses(torchrun(1, "pretrain_gpt.py", *TINY_GPT).stdout)
    trace_file = tmp_path / "trace.json"
    proc = torchrun(4, "pretrain_gpt.py", *TINY_GPT, *PIPELINE, "--pipeline-trace-file", str(trace_file))
    piped = _losses(proc.stdout)
    assert len(single) == 6 and len(piped) == 6, proc.stdout[-3000:]  # 4 iterations + valid + test
    for (head, loss), (ref_head, ref_loss) in zip(piped, single):
        assert head == ref_head
        # Same line to the printed precision (7 digits); the tied-embedding gradient is summed
        # in another order (stage copies vs one tensor), so allow one unit of the last digit.
        assert abs(loss - ref_loss) <= 1.5e-6 * ref_loss, (loss, ref_loss)
    events = [e for e in json.loads(trace_file.read_text())["traceEvents"] if e["ph"] == "X"]
    # 4 ranks x 4 steps x M=4 micro-batches x VPP=2 chunks x (forward + backward)
    assert len(events) == 4 * 4 * 4 * 2 * 2
    assert "theoretical (PP-1)/(VPP*M) = 0.1250" in proc.stdout


def test_micro_batches_not_a_multiple_of_pp_fail_at_start():
    flags = [f if f != "8" else "6" for f in TINY_GPT]  # global batch 6 -> M = 3 with DP = 1
    proc = torchrun(2, "pretrain_gpt.py", *flags, "--pipeline-model-parallel-size", "2",
                    "--num-layers-per-virtual-pipeline-stage", "1", check=False)
    err = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "number of micro-batches (3)" in err, err[-2000:]
    assert "--microbatch-group-size-per-virtual-pipeline-stage (2)" in err
    assert "--pipeline-model-parallel-size (2)" in err
    assert " iteration " not in err


def test_a_layout_string_prints_the_single_process_losses():
    """--pipeline-model-parallel-layout: PP 2 x VPP 2 with 3 layers on rank 0 (2 + 1) and 1 on
    rank 1, whose last chunk holds only the final norm, output layer and loss."""
    single = _losses(torchrun(1, "pretrain_gpt.py", *TINY_GPT).stdout)
    proc = torchrun(2, "pretrain_gpt.py", *TINY_GPT, "--pipeline-model-parallel-size", "2",
                    "--pipeline-model-parallel-layout", "Et*2|t|t|L")
    piped = _losses(proc.stdout)
    assert len(piped) == len(single) == 6, proc.stdout[-3000:]
    for (head, loss), (ref_head, ref_loss) in zip(piped, single):
        assert head == ref_head
        assert abs(loss - ref_loss) <= 1.5e-6 * ref_loss, (loss, ref_loss)

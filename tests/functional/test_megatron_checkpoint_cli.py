"""`--load` of checkpoints written by Megatron-LM itself (tests/data/megatron_checkpoints: its
iteration-2 checkpoints and the lines it printed for iterations 1-4). Resuming with Megatron's
flags must print Megatron's losses for iterations 3 and 4, at the saved layout and at others:
weights, Adam moments (plain and distributed optimizer), step count, scheduler and consumed
samples all come from Megatron's files."""
import os

import pytest

from tests.functional.test_pretrain_cli import ROOT, iteration_lines, resumed_loss, torchrun

FIXTURES = ROOT / "tests" / "data" / "megatron_checkpoints"

# The flags of the Megatron runs (tests/data/megatron_checkpoints/README.md), unchanged.
COMMON = """--mock-data --tokenizer-type NullTokenizer --vocab-size 512 --num-layers 4 --hidden-size 64
--num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2
--global-batch-size 8 --train-iters 4 --save-interval 2 --lr 1e-3 --min-lr 1e-4
--lr-decay-style cosine --lr-warmup-iters 1 --log-interval 1 --attention-dropout 0 --hidden-dropout 0
--seed 1234 --eval-iters 0 --eval-interval 1000 --transformer-impl local
--no-gradient-accumulation-fusion --no-persist-layer-norm --no-masked-softmax-fusion --split 1,0,0
--ckpt-format torch_dist --weight-decay 0.1 --clip-grad 1.0""".split()
LLAMA = """--bf16 --use-distributed-optimizer --position-embedding-type rope --normalization RMSNorm
--swiglu --disable-bias-linear --group-query-attention --num-query-groups 2
--untie-embeddings-and-output-weights --ffn-hidden-size 176 --no-rope-fusion""".split()
# What a user passes with --use-checkpoint-args: no model-shape flags.
SHAPELESS = """--use-checkpoint-args --mock-data --tokenizer-type NullTokenizer --micro-batch-size 2
--global-batch-size 8 --train-iters 4 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine
--lr-warmup-iters 1 --log-interval 1 --seed 1234 --eval-iters 0 --split 1,0,0 --weight-decay 0.1
--clip-grad 1.0 --bf16 --use-distributed-optimizer""".split()


def _megatron_rows(name):
    with open(FIXTURES / name / "megatron_iterations.log") as f:
        return {int(r[0]): r for r in iteration_lines(f.read())}


def _resume(name, nproc, flags):
    out = torchrun(nproc, "pretrain_gpt.py", *flags, "--distributed-backend", "gloo",
                   "--load", str(FIXTURES / name)).stdout
    assert f"loading distributed checkpoint from {FIXTURES / name} at iteration 2" in out
    return {int(r[0]): r for r in iteration_lines(out)}


def _check(rows, expected, rtol):
    """Megatron's lines come from one uninterrupted run; ours resume at iteration 3, so our
    iteration-4 loss averages iterations 3 and 4 as Megatron's own resumed run would
    (spec §3.2 'Cadence')."""
    assert sorted(rows) == [3, 4]
    losses = {it: row[5] for it, row in expected.items()}
    for it in (3, 4):
        ours, theirs = rows[it], expected[it]
        assert ours[2] == theirs[2] and ours[3] == theirs[3], (it, ours, theirs)  # consumed samples, lr
        loss, want = float(ours[5]), resumed_loss(losses, 3, it)
        assert abs(loss - want) <= rtol * want, (it, loss, want)
        assert abs(float(ours[6]) - float(theirs[6])) <= 0.0011, (it, ours[6], theirs[6])  # grad norm


@pytest.mark.parametrize("nproc,layout", [
    (1, []),
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    (2, ["--use-distributed-optimizer"]),
], ids=["saved-layout", "tp2-pp2", "dp2-distopt"])
def test_gpt_fp32_continues_megatron_run(nproc, layout):
    rows = _resume("gpt_tp1", nproc, COMMON + layout)
    _check(rows, _megatron_rows("gpt_tp1"), rtol=1e-5)


@pytest.mark.parametrize("nproc,flags", [
    (1, COMMON + LLAMA),
    (2, COMMON + LLAMA + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, COMMON + LLAMA),  # DP2: Megatron's flat DP=1 buffers cut into our two shards
    (1, SHAPELESS),
    # FSDP2 (2-D DTensor entries) takes Megatron's flat distributed-optimizer state too.
    (2, [f for f in COMMON + LLAMA if f != "--use-distributed-optimizer"] + ["--use-torch-fsdp2"]),
], ids=["saved-layout", "tp2-sp", "dp2", "use-checkpoint-args", "fsdp2-dp2"])
def test_llama_bf16_distributed_optimizer_continues_megatron_run(nproc, flags):
    rows = _resume("llama_tp1_bf16_distopt", nproc, flags)
    _check(rows, _megatron_rows("llama_tp1_bf16_distopt"), rtol=5e-5)


def test_model_shape_mismatch_is_one_line():
    flags = [f if f != "176" else "192" for f in COMMON + LLAMA]
    proc = torchrun(1, "pretrain_gpt.py", *flags, "--distributed-backend", "gloo",
                    "--load", str(FIXTURES / "llama_tp1_bf16_distopt"), check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {os.path.join(FIXTURES, 'llama_tp1_bf16_distopt', 'iter_0000002')}: "
                      "ffn_hidden_size is 176 in the checkpoint but 192 on the command line"], errors
    assert "[rank0]: Traceback" not in proc.stderr, proc.stderr[-2000:]  # torchrun's own is fine


def test_converted_checkpoints_continue_megatron_run(tmp_path):
    """tools/checkpoint/convert.py with Megatron's interface: Megatron -> megatron_lite, and that
    back to Megatron's layout; --load of either continues Megatron's own curve."""
    lite, back = tmp_path / "lite", tmp_path / "megatron"
    steps = (("core", "lite", FIXTURES / "gpt_tp1", lite), ("lite", "core", lite, back))
    for loader, saver, src, dst in steps:
        proc = torchrun(1, "tools/checkpoint/convert.py", "--model-type", "GPT", "--loader", loader,
                        "--saver", saver, "--load-dir", str(src), "--save-dir", str(dst))
        assert f"(weights and optimizer) of iteration 2 to {dst}/iter_0000002" in proc.stdout
    expected = _megatron_rows("gpt_tp1")
    for ckpt in (lite, back):
        out = torchrun(1, "pretrain_gpt.py", *COMMON, "--distributed-backend", "gloo",
                       "--load", str(ckpt)).stdout
        _check({int(r[0]): r for r in iteration_lines(out)}, expected, rtol=1e-5)

"""Per-layer CUDA graphs (`--cuda-graph-impl local`, models/cuda_graphs.py) on CUDA: replayed
layers give the eager run's losses and gradients, dropout (default generator and the TP
tracker's) and gradient-accumulation fusion included, on one GPU, at TP=2+SP (also with
--tp-comm-overlap), with the distributed optimizer, and under PP=2 (1F1B, interleaved, and
interleaved with --use-dpp)."""
import re

import pytest
import torch

from tests.functional.test_pretrain_cli import torchrun

pytestmark = pytest.mark.gpu

LINE = re.compile(r"iteration +(\d+)/.*lm loss: (\S+) \|")
# Megatron's default dropout (0.1 on attention and hidden states) on purpose.
GPT = """--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256
--max-position-embeddings 256 --tokenizer-type NullTokenizer --vocab-size 1024 --micro-batch-size 2
--global-batch-size 8 --train-iters 8 --lr 1e-3 --lr-warmup-iters 2 --mock-data --log-interval 1
--eval-iters 0 --seed 1234 --distributed-backend nccl""".split()
GRAPHS = ["--cuda-graph-impl", "local", "--cuda-graph-warmup-steps", "2"]


def _run(nproc, *flags):
    proc = torchrun(nproc, "pretrain_gpt.py", *GPT, *flags)
    rows = [LINE.search(line) for line in proc.stdout.splitlines()]
    return {int(m.group(1)): float(m.group(2)) for m in rows if m}, proc.stdout


def _same_curve(flags, nproc=1):
    eager, _ = _run(nproc, *flags)
    graphed, out = _run(nproc, *flags, *GRAPHS)
    assert "CUDA graphs: capturing every transformer layer after 2 warm-up iterations" in out, out[-3000:]
    assert sorted(eager) == sorted(graphed) == list(range(1, 9)), (eager, graphed)
    for it, loss in eager.items():
        # the same kernels on the same inputs; fp32 leaves only replay-vs-launch rounding (none expected)
        assert abs(graphed[it] - loss) <= 1e-5 * loss, (it, eager, graphed)


def test_graph_safe_tracker_draws_what_the_state_copying_one_draws():
    """distributed/random.py: installing state objects (graph-safe) or copying state tensors
    in and out, the same seed gives the same numbers inside and outside fork()."""
    from megatron_lite.distributed.random import MODEL_PARALLEL_RNG, build_rng_tracker

    device = torch.device("cuda", torch.cuda.current_device())
    runs = []
    for safe in (False, True):
        tracker = build_rng_tracker(7, 1, 0, device, graph_safe=safe)
        draws = []
        for _ in range(3):
            with tracker.fork():
                draws.append(torch.rand(5, device=device))
            draws.append(torch.rand(5, device=device))
        saved = tracker.state_dict()
        with tracker.fork():
            after = torch.rand(5, device=device)
        tracker.load_state_dict(saved)
        with tracker.fork():
            again = torch.rand(5, device=device)
        assert torch.equal(after, again), safe
        runs.append((torch.stack(draws), saved[MODEL_PARALLEL_RNG]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_graphed_layers_print_the_eager_curve_fp32_without_dropout():
    _same_curve(["--attention-dropout", "0", "--hidden-dropout", "0"])


def test_graphed_layers_print_the_eager_curve_fp32():
    _same_curve([])


def test_graphed_layers_print_the_eager_curve_bf16_with_fusion():
    _same_curve(["--bf16"])


def test_graphed_layers_tp2_sp():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _same_curve(["--tensor-model-parallel-size", "2", "--sequence-parallel"], nproc=2)


def test_graphed_layers_dp2_distributed_optimizer_overlapped_gather():
    """The replay calls the layers' param-gather waits (forward pre-hooks) itself."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _same_curve(["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"], nproc=2)


def test_graphed_layers_tp2_sp_tp_comm_overlap():
    """The collective-matmul rings' point-to-point steps are captured with the GEMMs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _same_curve(["--tensor-model-parallel-size", "2", "--sequence-parallel", "--tp-comm-overlap"], nproc=2)


def test_graphed_layers_pp2():
    """1F1B holds two micro-batches on the first stage: two copies of its graphs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _same_curve(["--pipeline-model-parallel-size", "2"], nproc=2)


def test_graphed_layers_pp2_vpp2():
    """Interleaved: each chunk captured mid-step, as many copies as it holds micro-batches."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _same_curve(["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
                nproc=2)


def test_graphed_layers_pp2_vpp2_dpp():
    """--use-dpp: captured on the main thread while the channel threads send and receive."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _same_curve(["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                 "--use-dpp"], nproc=2)

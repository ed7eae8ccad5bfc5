"""The memory-scaling flags end to end through torchrun on CPU (issue 17): `--use-torch-fsdp2` and
`--optimizer-cpu-offload` (fractions 1.0 and 0.5, with the distributed optimizer and overlapped
copies) print the lm-loss lines of the plain run; an FSDP2 run saves, resumes bit for bit, and
its checkpoint continues the curve with the distributed optimizer."""
import pytest

from tests.functional.test_checkpoint_cli import TINY_GPT, _assert_resumed, _rows
from tests.functional.test_pretrain_cli import TINY_LLAMA, iteration_lines, resumed_loss, torchrun

FSDP2 = ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"]


@pytest.fixture(scope="module")
def plain_lines():
    return iteration_lines(torchrun(1, "pretrain_llama.py", *TINY_LLAMA).stdout)


@pytest.mark.parametrize("nproc,extra", [
    (2, FSDP2),
    (2, [*FSDP2, "--context-parallel-size", "2"]),
    (1, ["--optimizer-cpu-offload"]),
    (2, ["--use-distributed-optimizer", "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5",
         "--overlap-cpu-optimizer-d2h-h2d"]),
], ids=["fsdp2-dp2", "fsdp2-cp2", "offload-1.0", "offload-0.5-distopt-dp2"])
def test_memory_layouts_print_the_plain_losses(plain_lines, nproc, extra):
    lines = iteration_lines(torchrun(nproc, "pretrain_llama.py", *TINY_LLAMA, *extra).stdout)
    # lm loss and learning rate identical to the printed precision; grad norm to 3 decimals.
    assert [(r[0], r[3], r[5]) for r in lines] == [(r[0], r[3], r[5]) for r in plain_lines]
    for a, b in zip(lines, plain_lines):
        assert abs(float(a[6]) - float(b[6])) <= 2e-3


def test_fsdp2_checkpoint_resumes_and_continues_with_the_distributed_optimizer(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    uninterrupted = _rows(torchrun(2, "pretrain_gpt.py", *TINY_GPT, *FSDP2).stdout)
    torchrun(2, "pretrain_gpt.py", *TINY_GPT, *FSDP2, "--save", ckpt, "--save-interval", "4",
             "--exit-interval", "4")
    resumed = _rows(torchrun(2, "pretrain_gpt.py", *TINY_GPT, *FSDP2, "--load", ckpt).stdout)
    assert sorted(resumed) == [5, 6, 7, 8]
    _assert_resumed(resumed, uninterrupted)  # same layout: the same lines
    # The same DP ranks draw the same dropout masks with DDP: the curve continues.
    other = _rows(torchrun(2, "pretrain_gpt.py", *TINY_GPT, "--use-distributed-optimizer", "--load",
                           ckpt).stdout)
    losses = {it: row[1] for it, row in uninterrupted.items()}
    assert sorted(other) == [5, 6, 7, 8]
    for it, (lr, loss, norm) in other.items():
        assert lr == uninterrupted[it][0], it
        assert float(loss) == pytest.approx(resumed_loss(losses, 5, it), rel=1e-5), it
        assert float(norm) == pytest.approx(float(uninterrupted[it][2]), rel=1e-3), it


@pytest.mark.parametrize("nproc,extra,words", [
    (1, FSDP2, ["--use-torch-fsdp2", "data-parallel x context-parallel"]),
    (2, ["--use-torch-fsdp2"], ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"]),
    (2, [*FSDP2, "--use-distributed-optimizer"], ["--use-torch-fsdp2", "--use-distributed-optimizer"]),
    (2, [*FSDP2, "--pipeline-model-parallel-size", "2"], ["--use-torch-fsdp2", "pipeline"]),
    (1, ["--optimizer-offload-fraction", "0.5"], ["--optimizer-offload-fraction", "--optimizer-cpu-offload"]),
    (1, ["--optimizer-cpu-offload", "--optimizer-offload-fraction", "1.5"], ["--optimizer-offload-fraction"]),
], ids=["fsdp2-one-rank", "fsdp2-fusion", "fsdp2-distopt", "fsdp2-pp", "fraction-alone", "fraction-range"])
def test_impossible_memory_layouts_fail_in_one_line(nproc, extra, words):
    proc = torchrun(nproc, "pretrain_llama.py", *TINY_LLAMA, *extra, check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert errors and all(w in errors[0] for w in words), (proc.stdout + proc.stderr)[-2000:]

"""Context parallelism end to end through torchrun on CPU (spec §9): `pretrain_llama.py
--context-parallel-size 2` prints the lm-loss lines of the CP=1 run for every --cp-comm-type
(Llama with GQA, fp32), and a checkpoint saved at CP=2 loads at CP=1 (and back at CP=2) and
at CP=4, continuing the same curve."""
import re

import pytest

from tests.functional.test_pretrain_cli import TINY_LLAMA as TINY_LLAMA_BASE
from tests.functional.test_pretrain_cli import resumed_loss, torchrun

pytestmark = pytest.mark.slow

# test_pretrain_cli's tiny Llama (GQA), every iteration logged.
TINY_LLAMA = [*TINY_LLAMA_BASE[:TINY_LLAMA_BASE.index("--log-interval") + 1], "1",
              *TINY_LLAMA_BASE[TINY_LLAMA_BASE.index("--log-interval") + 2:]]
LOSS = re.compile(r" iteration +(\d+)/.*lm loss: (\S+) \|"
                  r"| (validation loss at [^|]*)\| lm loss value: (\S+) \|")


def _losses(stdout):
    """[(iteration or validation label, loss)] in printed order."""
    rows = []
    for m in map(LOSS.search, stdout.splitlines()):
        if m:
            rows.append((m.group(1) or m.group(3).strip(), float(m.group(2) or m.group(4))))
    return rows


def _same_curve(got, ref):
    assert [k for k, _ in got] == [k for k, _ in ref], (got, ref)
    for (key, a), (_, b) in zip(got, ref):
        # Printed with 7 digits; the CP blocks sum attention in another order.
        assert abs(a - b) <= 2e-6 * b, (key, a, b)


def _resumed(ref, *firsts):
    """`ref` (an uninterrupted curve) as runs starting at each iteration of `firsts` print it: the
    line after a run's first averages both iterations (spec §3.2 'Cadence')."""
    losses = {key: loss for key, loss in ref if key.isdigit()}
    seconds = {str(f + 1): resumed_loss({int(k): v for k, v in losses.items()}, f, f + 1) for f in firsts}
    return [(key, seconds.get(key, loss)) for key, loss in ref if key not in ("1", "2")]


@pytest.fixture(scope="module")
def cp1():
    return _losses(torchrun(1, "pretrain_llama.py", *TINY_LLAMA).stdout)


@pytest.mark.parametrize("layout", [
    ["--cp-comm-type", "p2p"], ["--cp-comm-type", "allgather"], ["--cp-comm-type", "a2a"],
    ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "1"],
    ["--cp-comm-type", "p2p", "a2a", "--recompute-granularity", "full", "--recompute-method", "uniform",
     "--recompute-num-layers", "1"],
], ids=["p2p", "allgather", "a2a", "a2a+p2p", "per-layer-recompute"])
def test_cp2_prints_the_cp1_losses(cp1, layout):
    proc = torchrun(2, "pretrain_llama.py", *TINY_LLAMA, "--context-parallel-size", "2", *layout)
    assert "context-parallel size: 2" in proc.stdout
    got = _losses(proc.stdout)
    assert len(got) == 6 + 2 + 2, proc.stdout[-3000:]  # 6 iterations, 2 evaluations, valid + test at the end
    _same_curve(got, cp1)


def test_checkpoint_cp2_to_cp1_to_cp2_continues_the_curve(tmp_path, cp1):
    ckpt = str(tmp_path / "ckpt")
    cp2 = ["--context-parallel-size", "2"]
    first = torchrun(2, "pretrain_llama.py", *TINY_LLAMA, *cp2, "--save", ckpt, "--save-interval", "2",
                     "--exit-interval", "2")
    assert "successfully saved checkpoint from iteration       2" in first.stdout
    middle = torchrun(1, "pretrain_llama.py", *TINY_LLAMA, "--load", ckpt, "--save", ckpt,
                      "--save-interval", "2", "--exit-interval", "4")
    last = torchrun(2, "pretrain_llama.py", *TINY_LLAMA, *cp2, "--load", ckpt)
    resumed = _losses(middle.stdout) + _losses(last.stdout)  # iterations 3-4, then 5-6 and evaluations
    _same_curve(resumed, _resumed(cp1, 3, 5))
    # The CP2 checkpoint of iteration 2 also continues at CP4 (4 ranks, chunks of 4 tokens).
    cp4 = torchrun(4, "pretrain_llama.py", *TINY_LLAMA, "--context-parallel-size", "4",
                   "--load", ckpt, "--ckpt-step", "2")
    _same_curve(_losses(cp4.stdout), _resumed(cp1, 3))

"""--check-for-nan-in-loss-and-grad through torchrun on CPU: a NaN planted in one rank's
gradient ends the job with that rank's one `error:` line and a non-zero exit, the iteration
is never logged by that rank, and no checkpoint of it (or after it) is written. The check no
longer syncs the host in every step (training/nonfinite.py), so these pin the behaviour the
synchronous check had."""
import os

import pytest

from tests.functional.test_checkpoint_cli import TINY_GPT
from tests.functional.test_pretrain_cli import torchrun

pytestmark = pytest.mark.slow

# Wraps DDP so that the gradient of one (never fused) norm weight turns NaN in the given
# backward call on one rank, then runs pretrain_gpt.py's main.
_DRIVER = """
import os, sys
from megatron_lite.data_parallel.ddp import DistributedDataParallel
from megatron_lite.training.pretrain import pretrain

_init = DistributedDataParallel.__init__


def init(self, module, ps, config):
    _init(self, module, ps, config)
    if os.environ["RANK"] != "{rank}":
        return
    calls = [0]

    def poison(g):
        calls[0] += 1
        return g * float("nan") if calls[0] == {call} else g

    dict(module.named_parameters())["decoder.layers.0.input_layernorm.weight"].register_hook(poison)


DistributedDataParallel.__init__ = init
sys.exit(pretrain(defaults={{"tokenizer_type": "GPT2BPETokenizer"}}))
"""

GRAD_ERROR = ("error: Rank {rank}: found NaN in local grad norm for bucket #0 in backward pass before "
              "data-parallel communication collective (--no-check-for-nan-in-loss-and-grad turns this "
              "check off)")


def _with(flags, name, value):
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


def _run(tmp_path, nproc, rank, iteration, *flags):
    """NaN in the first micro-batch of `iteration` (global batch 8 of micro-batches of 2)."""
    per_iteration = 8 // (2 * nproc)
    driver = tmp_path / "nan_driver.py"
    driver.write_text(_DRIVER.format(rank=rank, call=(iteration - 1) * per_iteration + 1))
    return torchrun(nproc, str(driver), *flags, check=False)


def _errors(proc):
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]


def test_nan_gradient_on_one_data_parallel_rank_is_one_error_line(tmp_path):
    proc = _run(tmp_path, 2, 0, 3, *TINY_GPT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = _errors(proc)
    # Rank 1 may see its peer vanish in a collective first and say so (training/failures.py).
    assert errors.count(GRAD_ERROR.format(rank=0)) == 1, proc.stderr[-3000:]
    assert all(e == GRAD_ERROR.format(rank=0) or e.startswith("error: rank 1: a collective failed")
               for e in errors), errors
    assert "[rank0]: Traceback" not in proc.stderr
    assert " iteration        2/" in proc.stdout


def test_no_checkpoint_after_an_unchecked_nan(tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*_with(TINY_GPT, "--log-interval", "4"), "--save", str(ckpt), "--save-interval", "3"]
    proc = _run(tmp_path, 1, 0, 3, *flags)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert _errors(proc) == [GRAD_ERROR.format(rank=0)], proc.stderr[-3000:]
    assert "saving checkpoint" not in proc.stdout
    assert not ckpt.exists() or not any(p.startswith("iter_") for p in os.listdir(ckpt))
    assert " iteration        3/" not in proc.stdout and " iteration        4/" not in proc.stdout

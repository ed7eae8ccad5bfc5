"""Checkpoints on CUDA through `pretrain_gpt.py` over NCCL: saving (pinned host staging; with
`--async-save` the background write on a gloo group of its own) leaves training unchanged, and
a run resumed from the checkpoint continues with the same lines."""
import os

import pytest
import torch

from tests.functional.test_checkpoint_cli import TINY_GPT, _rows
from tests.functional.test_pretrain_cli import resumed_loss, torchrun

pytestmark = pytest.mark.gpu

CUDA_GPT = [f for f in TINY_GPT if f != "gloo"]
CUDA_GPT[CUDA_GPT.index("--distributed-backend") + 1:CUDA_GPT.index("--distributed-backend") + 1] = ["nccl"]
CUDA_GPT += ["--bf16", "--hidden-dropout", "0", "--attention-dropout", "0"]


@pytest.fixture(scope="module")
def reference():
    """Lines of a run without saves, per layout (computed once each)."""
    cache = {}

    def lines(nproc, layout):
        key = (nproc, tuple(layout))
        if key not in cache:
            cache[key] = _rows(torchrun(nproc, "pretrain_gpt.py", *CUDA_GPT, *layout).stdout)
        return cache[key]

    return lines


@pytest.mark.parametrize("mode,layout", [
    ([], []), (["--async-save"], []), (["--async-save"], ["--tensor-model-parallel-size", "2"]),
], ids=["sync", "async", "async-tp2"])
def test_save_on_cuda_resumes(tmp_path, reference, mode, layout):
    nproc = min(2, torch.cuda.device_count())
    if layout and nproc < 2:
        pytest.skip("needs 2 GPUs")
    plain = reference(nproc, layout)
    ckpt = str(tmp_path / "ckpt")
    saving = torchrun(nproc, "pretrain_gpt.py", *CUDA_GPT, *layout, "--save", ckpt, "--save-interval", "2",
                      *mode).stdout
    assert _rows(saving) == plain
    assert "] successfully saved checkpoint from iteration       8" in saving
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "8"
    resumed = _rows(torchrun(nproc, "pretrain_gpt.py", *CUDA_GPT, *layout, "--load", ckpt,
                             "--ckpt-step", "4").stdout)
    assert sorted(resumed) == [5, 6, 7, 8]
    losses = {it: row[1] for it, row in plain.items()}
    for it, (lr, loss, _norm) in resumed.items():
        assert lr == plain[it][0]
        # The resumed run's second line averages iterations 5 and 6 (spec §3.2 'Cadence').
        assert float(loss) == pytest.approx(resumed_loss(losses, 5, it), rel=1e-3)

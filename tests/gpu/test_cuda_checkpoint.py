"""Checkpoints on CUDA through `pretrain_gpt.py` over NCCL: `--async-save` (pinned host staging,
the background write on a gloo group of its own) leaves training unchanged, and a run resumed
from a checkpoint written while training went on continues with the same lines."""
import os

import pytest
import torch

from tests.functional.test_checkpoint_cli import TINY_GPT, _rows
from tests.functional.test_pretrain_cli import torchrun

pytestmark = pytest.mark.gpu

CUDA_GPT = [f for f in TINY_GPT if f != "gloo"]
CUDA_GPT[CUDA_GPT.index("--distributed-backend") + 1:CUDA_GPT.index("--distributed-backend") + 1] = ["nccl"]
CUDA_GPT += ["--bf16", "--hidden-dropout", "0", "--attention-dropout", "0"]


def test_async_save_on_cuda_resumes(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    ckpt = str(tmp_path / "ckpt")
    plain = _rows(torchrun(nproc, "pretrain_gpt.py", *CUDA_GPT).stdout)
    saving = torchrun(nproc, "pretrain_gpt.py", *CUDA_GPT, "--save", ckpt, "--save-interval", "2",
                      "--async-save").stdout
    assert _rows(saving) == plain
    assert "  successfully saved checkpoint from iteration       8" in saving
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read() == "8"
    resumed = _rows(torchrun(nproc, "pretrain_gpt.py", *CUDA_GPT, "--load", ckpt, "--ckpt-step", "4").stdout)
    assert sorted(resumed) == [5, 6, 7, 8]
    for it, (lr, loss, _norm) in resumed.items():
        assert lr == plain[it][0]
        assert float(loss) == pytest.approx(float(plain[it][1]), rel=1e-3)

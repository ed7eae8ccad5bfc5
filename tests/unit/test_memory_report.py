"""The memory line of spec §3.4: printed after the first two printed iterations, nothing on CPU."""
import io

import torch

from megatron_lite.training.logging import RankLogger
from megatron_lite.training.memory import memory_report_line
from megatron_lite.training.microbatches import MicroBatchCalculator
from megatron_lite.training.tensorboard import TensorboardConfig, TensorboardLogger
from megatron_lite.training.timers import Timers
from megatron_lite.training.train_loop import LoopConfig, LoopHooks, LoopState, Trainer
from megatron_lite.training.train_step import StepResult


class _Opt:
    loss_scale = 1.0
    param_groups = [{"lr": 0.1}]


class _Sched:
    def step(self, n):
        pass


def test_memory_report_follows_the_first_two_printed_iterations():
    reports = []
    step = lambda m: StepResult(torch.tensor([1.0, 1.0]), True, torch.tensor(1.0))
    cfg = LoopConfig(train_iters=7, log_interval=3, seq_length=8, world_size=1, flops_per_sample=1.0)
    trainer = Trainer(cfg, LoopHooks(step, memory_report=reports.append), optimizer=_Opt(),
                      scheduler=_Sched(), batches=MicroBatchCalculator(4, 1, 1), timers=Timers(),
                      logger=RankLogger(0, 1, io.StringIO()),
                      tensorboard=TensorboardLogger(TensorboardConfig(None), True), device="cpu")
    trainer.train(LoopState())
    assert reports == [1, 3]


def test_memory_line_is_cuda_only():
    assert memory_report_line(0, 1, "cpu") is None
    if torch.cuda.is_available():
        line = memory_report_line(3, 1, "cuda")
        assert line.startswith("[Rank 3] (after 1 iterations) memory (MB) | allocated: ")
        assert "| max allocated: " in line and "| max reserved: " in line

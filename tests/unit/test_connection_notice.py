"""The one-line notice for Megatron's CUDA_DEVICE_MAX_CONNECTIONS=1 under tensor parallelism."""
from types import SimpleNamespace

import torch

from megatron_lite.training.pretrain import single_connection_notice

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_named_only_for_tensor_parallel_cuda_runs_with_one_connection():
    tp2, tp1 = SimpleNamespace(tensor_model_parallel_size=2), SimpleNamespace(tensor_model_parallel_size=1)
    one = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    line = single_connection_notice(tp2, CUDA, one)
    assert line.startswith("WARNING: CUDA_DEVICE_MAX_CONNECTIONS=1 ") and "\n" not in line
    assert single_connection_notice(tp1, CUDA, one) is None
    assert single_connection_notice(tp2, CPU, one) is None
    assert single_connection_notice(tp2, CUDA, {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}) is None
    assert single_connection_notice(tp2, CUDA, {}) is None

"""The training step on CUDA does not synchronize the host (DESIGN "Performance principles"):
with --check-for-nan-in-loss-and-grad recorded on the device (training/nonfinite.py), a bf16
step of a tiny GPT under `torch.cuda.set_sync_debug_mode("warn")` raises no synchronization
warning; and a NaN gradient is still reported, with the synchronous check's message."""
import warnings

import pytest
import torch

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel, NonFiniteError
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.optimizer.core import OptimizerConfig
from megatron_lite.optimizer.mixed_precision import MixedPrecisionOptimizer
from megatron_lite.training.nonfinite import NonFiniteCheck
from megatron_lite.training.train_step import train_step
from tests.dp_utils import micro_batches
from tests.model_utils import build, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _trainable():
    ps = ParallelState.create()
    model = build(tiny_config("gpt", params_dtype=torch.bfloat16), ps, device="cuda")
    ddp = DistributedDataParallel(model, ps, DDPConfig(check_for_nan_in_grad=True, overlap_grad_reduce=True,
                                                        bucket_size=20_000))
    opt = MixedPrecisionOptimizer(model.named_parameters(), OptimizerConfig(lr=1e-3, clip_grad=1.0), ps)
    return ps, model, ddp, opt, micro_batches(model.config.vocab_size, 0, 1)


def test_step_with_the_nan_check_does_not_sync_the_host():
    ps, _, ddp, opt, data = _trainable()
    check = NonFiniteCheck()
    for _ in range(2):  # warm-up: optimizer state, compiled fusions, allocator
        train_step(ddp, opt, data, 4, ps, CUDA, nan_check=check)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                train_step(ddp, opt, data, 4, ps, CUDA, nan_check=check)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # set_sync_debug_mode itself warns that it is a prototype: that line is not a sync.
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    assert not syncs, "\n".join(syncs)
    check.raise_if_found()  # and the clean steps recorded nothing


def test_nan_gradient_is_reported_after_the_step():
    ps, model, ddp, opt, data = _trainable()
    # A norm's weight, its gradient-accumulation fusion turned off: fused gradients (linears',
    # biases', and the Triton norms' own) go into main_grad without passing tensor hooks.
    model.decoder.final_layernorm.grad_params = lambda: None
    norm = dict(model.named_parameters())["decoder.final_layernorm.weight"]
    norm.register_hook(lambda g: g * float("nan"))
    check = NonFiniteCheck()
    train_step(ddp, opt, data, 4, ps, CUDA, nan_check=check)
    with pytest.raises(NonFiniteError, match=r"^Rank 0: found NaN in local grad norm for bucket #\d+ in "
                                             r"backward pass before data-parallel communication collective$"):
        check.raise_if_found()

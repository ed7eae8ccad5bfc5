"""The vocab-parallel cross-entropy against spec §11's algorithm on the same logits: shared by
the GPU tests on one GPU (tests/gpu/test_cuda_output_loss.py) and over NCCL TP2
(tests/gpu/test_nccl_collectives.py)."""
import torch

from megatron_lite.tensor_parallel.cross_entropy import (
    _VocabParallelCrossEntropy,
    vocab_parallel_cross_entropy,
)


def losses_and_grads_against_spec(shard: torch.Tensor, target: torch.Tensor, group, smoothing: float,
                                  grad: torch.Tensor):
    """(loss, spec's loss, logits gradient, spec's logits gradient) of `shard` `[s, b, V/tp]`
    for `target` `[s, b]`, each loss weighted by `grad` `[s, b]` before the backward."""
    ours, spec = shard.clone().requires_grad_(), shard.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours, target, group, smoothing)
    spec_loss = _VocabParallelCrossEntropy.apply(spec, target, group, smoothing)
    (loss * grad).sum().backward()
    (spec_loss * grad).sum().backward()
    return loss, spec_loss, ours.grad, spec.grad

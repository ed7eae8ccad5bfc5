"""tools/benchmark.py with the tensor-parallel collectives replaced by local copies of the
right shapes: what a TP step would cost if its communication were free. A probe for issue 13,
not a training path (the losses it prints are meaningless).

    torchrun --nproc_per_node 2 tools/bench/tp_comm_free.py --preset gpt-1.3b \
        --tensor-model-parallel-size 2 --sequence-parallel --num-micro-batches 4

Compared with the same command through tools/benchmark.py it splits a TP step's excess over
its compute into (a) what the collectives cost the host and the GPU and (b) everything else
(the extra autograd Functions, the per-rank host). At a short --seq-length (128) the GPU work
is nearly nil and the step is the host's time. Only the TP helpers of
megatron_lite/tensor_parallel/collectives.py are replaced; parameter initialisation and
torchrun's rendezvous still communicate.

Measured on one 2xH200 machine (torch 2.11), GPT 1.3B, micro-batch 4, 4 micro-batches, ms per
step: sequence 128 (the host's time): one GPU 240, TP2 + SP 352, this probe 258; sequence 2048:
one GPU 544, TP2 + SP 396, this probe 327.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.distributed as dist

from megatron_lite.tensor_parallel import collectives


class _Done:
    """A finished Work handle."""

    def wait(self) -> bool:
        return True


def _all_gather(out: torch.Tensor, x: torch.Tensor, group=None, async_op=False):
    # [tp*n, ...] <- x repeated: one copy kernel, as the real gather writes `out` once
    out.view(-1, x.numel()).copy_(x.reshape(1, -1).expand(out.numel() // x.numel(), -1))
    return _Done() if async_op else None


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor, op=None, group=None, async_op=False):
    out.copy_(x.view((-1,) + tuple(out.shape))[0])  # [n, ...] -> this rank's [n/tp, ...]
    return _Done() if async_op else None


def _all_reduce(x: torch.Tensor, op=None, group=None, async_op=False):
    return _Done() if async_op else None  # the local partial sum stands for the total


def main() -> None:
    shim = types.SimpleNamespace(**{k: getattr(dist, k) for k in dir(dist) if not k.startswith("__")})
    shim.all_reduce = _all_reduce
    collectives.dist = shim
    collectives._all_gather_flat = _all_gather
    collectives._reduce_scatter_flat = _reduce_scatter
    from tools import benchmark

    sys.argv[0] = "tools/benchmark.py"
    benchmark.main()


if __name__ == "__main__":
    main()

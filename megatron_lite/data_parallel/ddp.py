"""Data parallelism for one model chunk: gradients accumulate in contiguous buffers and are
reduced over the DP×CP group bucket by bucket; with the distributed optimizer, updated
parameters are all-gathered back from their shards (spec §8.1-8.3).

How a (pipeline) schedule drives it, per iteration:
  `zero_grad_buffer()`; micro-batches 1..M-1 inside `no_sync()` (grads only accumulate);
  the last micro-batch's backward with sync enabled: with `overlap_grad_reduce` each bucket's
  collective starts from a grad hook as soon as its last grad has arrived; then
  `finish_grad_sync()` (through `finalize.finalize_grads`) launches whatever is left and waits.
The optimizer then steps; the distributed optimizer calls `start_param_sync()`, which
all-gathers at once, or (with `overlap_param_gather`) launches the gathers and lets forward
pre-hooks wait for each bucket just before its first use.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite.data_parallel.buffers import Bucket, ParamAndGradBuffer
from megatron_lite.tensor_parallel.collectives import (
    Pending,
    all_gather,
    all_reduce,
    group_rank,
    reduce_scatter,
)


class NonFiniteError(RuntimeError):
    """A NaN or Inf in the loss or the gradients (--check-for-nan-in-loss-and-grad)."""


@dataclass(frozen=True)
class DDPConfig:
    grad_reduce_in_fp32: bool = True  # --accumulate-allreduce-grads-in-fp32 (forced on with --bf16)
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    use_distributed_optimizer: bool = False
    bucket_size: int | None = None  # elements; None: one bucket per buffer (see default_bucket_size)
    average_in_collective: bool = False
    calculate_per_token_loss: bool = False
    check_for_nan_in_grad: bool = False  # --check-for-nan-in-loss-and-grad
    pad_buckets_for_high_nccl_busbw: bool = False


def default_bucket_size(bucket_size: int | None, num_buckets: int | None, num_params: int, dp_cp: int,
                        overlap_grad_reduce: bool, pp_rank: int = 0, chunk_index: int = 0) -> int | None:
    """`--ddp-bucket-size` resolution of spec §8.1 (Megatron's `resolve_ddp_bucket_size`).

    Buckets only pay off when their reduction overlaps the backward, so without overlap, on
    pipeline ranks > 0 (whose DP traffic is off the critical path) and for virtual chunks after
    the first, the whole buffer is one bucket.
    """
    if not overlap_grad_reduce or pp_rank > 0 or chunk_index > 0:
        return None
    if bucket_size is not None:
        return bucket_size
    if num_buckets is not None:
        return max(num_params // num_buckets, 1)
    return max(40_000_000, 1_000_000 * dp_cp)


@dataclass
class _BucketSync:
    """Communication state of one bucket during one iteration."""

    bucket: Bucket
    pending: set = field(default_factory=set)  # params whose last-micro-batch grad has not arrived
    launched: bool = False
    grad_work: Pending | None = None
    local_norm: torch.Tensor | None = None  # pre-reduction L2 norm, for the NaN check
    param_work: Pending | None = None


class DistributedDataParallel(torch.nn.Module):
    """Wraps one model chunk; `forward` is the chunk's. Parameters keep their identity (the
    optimizer and checkpoints see `self.module`'s names), gain a `main_grad` view and, with
    the distributed optimizer, have their storage moved into the param buffer."""

    def __init__(self, module: torch.nn.Module, ps, config: DDPConfig):
        super().__init__()
        self.module, self.ps, self.config = module, ps, config
        self.group = ps.dp_cp_group  # spec §8.2: grads are reduced over DP x CP
        self.shard_world = ps.dp_size * ps.cp_size
        self.shard_rank = group_rank(self.group)
        by_dtype: dict[tuple[torch.dtype, torch.dtype], list[torch.nn.Parameter]] = {}
        for p in module.parameters():
            if p.requires_grad:
                by_dtype.setdefault((p.dtype, self._grad_dtype(p)), []).append(p)
        self.param_buffers = [
            ParamAndGradBuffer(params, grad_dtype, self.shard_world, config.bucket_size,
                               config.use_distributed_optimizer, config.pad_buckets_for_high_nccl_busbw)
            for (_, grad_dtype), params in by_dtype.items()]
        self._syncs = [_BucketSync(b) for buf in self.param_buffers for b in buf.buckets]
        self._sync_of = {p: s for s in self._syncs for p in s.bucket.params}
        for p in self._sync_of:
            # Megatron's protocol (spec §7.1): a linear layer whose weight has this attribute
            # may accumulate its weight gradient into `main_grad` itself and set it to True;
            # `_on_grad_ready` then discards the placeholder gradient (tensor_parallel/layers.py).
            p.grad_added_to_main_grad = False
        self._grad_sync_enabled = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._sync_of]
        if config.use_distributed_optimizer and config.overlap_param_gather:
            self._register_param_wait_hooks()
        self.zero_grad_buffer()

    def _grad_dtype(self, p: torch.nn.Parameter) -> torch.dtype:
        # spec §7.1: main grads are fp32 when asked for (always for fp32 params), else param dtype.
        return torch.float32 if self.config.grad_reduce_in_fp32 else p.dtype

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def buckets(self) -> list[Bucket]:
        return [s.bucket for s in self._syncs]

    # ---- gradient accumulation and reduction ----------------------------------------------
    def zero_grad_buffer(self) -> None:
        """Start of an iteration: zero the main grads and re-arm every bucket."""
        for s in self._syncs:
            if s.grad_work is not None:
                raise RuntimeError("zero_grad_buffer() while a gradient reduction is in flight; "
                                   "call finish_grad_sync() first")
            s.pending, s.launched, s.local_norm = set(s.bucket.params), False, None
        for buf in self.param_buffers:
            buf.zero_grad()

    def enable_grad_sync(self, enabled: bool) -> None:
        """False for all but the last micro-batch (spec §8.2): grads only accumulate."""
        self._grad_sync_enabled = enabled

    @contextlib.contextmanager
    def no_sync(self):
        previous = self._grad_sync_enabled
        self._grad_sync_enabled = False
        try:
            yield
        finally:
            self._grad_sync_enabled = previous

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if param.grad is not None:
            if param.grad_added_to_main_grad:
                param.grad_added_to_main_grad = False  # the wgrad GEMM accumulated it already
            else:
                param.main_grad.add_(param.grad)  # fp32 accumulation across micro-batches
            param.grad = None
        if not (self._grad_sync_enabled and self.config.overlap_grad_reduce):
            return
        s = self._sync_of[param]
        if param not in s.pending:
            raise RuntimeError("a parameter received a second gradient after its bucket's reduction "
                               "started; use no_sync() for all but the last micro-batch")
        s.pending.discard(param)
        if not s.pending:
            self._launch(s)

    def _scale_and_op(self):
        """spec §8.1: pre-scale by 1/(DP*CP) and SUM; or AVG in the collective (NCCL only, gloo
        has no AVG); or no scaling with per-token loss (finalize divides by the token count)."""
        if self.config.calculate_per_token_loss:
            return 1.0, dist.ReduceOp.SUM
        if self.config.average_in_collective and dist.get_backend(self.group) == dist.Backend.NCCL:
            return 1.0, dist.ReduceOp.AVG
        return 1.0 / self.shard_world, dist.ReduceOp.SUM

    def _launch(self, s: _BucketSync) -> None:
        s.launched = True
        grad = s.bucket.grad  # [n]
        if self.config.check_for_nan_in_grad:
            s.local_norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        if self.shard_world == 1:
            return
        factor, op = self._scale_and_op()
        if factor != 1.0:
            grad.mul_(factor)
        if self.config.use_distributed_optimizer:
            lo, hi = s.bucket.shard_range(self.shard_rank, self.shard_world)
            # [n] -> this rank's fully reduced shard [n/(dp*cp)], in place (spec §8.2)
            s.grad_work = reduce_scatter(grad, 0, self.group, async_op=True, op=op, out=grad[lo:hi])
        else:
            s.grad_work = all_reduce(grad, self.group, op=op, async_op=True)  # [n]

    def start_grad_sync(self) -> None:
        """Launch the reduction of every bucket not launched yet (all of them without overlap),
        in bucket order, which is the same on every DP rank."""
        for s in self._syncs:
            if not s.launched:
                self._launch(s)

    def finish_grad_sync(self) -> None:
        """Wait until every bucket is reduced; then `main_grad` (its local shard with the
        distributed optimizer) holds the DP×CP-reduced gradient."""
        self.finish_param_sync()
        self.start_grad_sync()
        for s in self._syncs:
            if s.grad_work is not None:
                s.grad_work.wait()
                s.grad_work = None

    def nonfinite_grad_flags(self) -> torch.Tensor | None:
        """`[buckets]` bool on the device, True where a bucket's local grad norm (taken before
        the DP reduction, so it names the rank the NaN/Inf came from) is not finite; None
        without `check_for_nan_in_grad`. After `finish_grad_sync`; read by the caller when it
        chooses (training/nonfinite.py), so the check costs no host sync here."""
        if not self.config.check_for_nan_in_grad:
            return None
        return ~torch.isfinite(torch.stack([s.local_norm for s in self._syncs]))  # [buckets]

    def nonfinite_grad_message(self, bucket: int) -> str:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return (f"Rank {rank}: found NaN in local grad norm for bucket #{bucket} in backward pass before "
                "data-parallel communication collective")

    def scale_gradients(self, factor: float | torch.Tensor) -> None:
        for buf in self.param_buffers:
            buf.scale_grad(factor)

    # ---- parameter all-gather (distributed optimizer) ---------------------------------------
    def start_param_sync(self, force_sync: bool = False) -> None:
        """All-gather each bucket's updated shard into the full param buffer (spec §8.3).
        Asynchronous with `overlap_param_gather` (forward pre-hooks wait), else blocking."""
        if not self.config.use_distributed_optimizer:
            return
        self.finish_param_sync()
        if self.shard_world == 1:
            return
        overlap = self.config.overlap_param_gather and not force_sync
        # Buckets hold params in reverse order, so forward needs the last bucket first.
        for s in reversed(self._syncs):
            lo, hi = s.bucket.shard_range(self.shard_rank, self.shard_world)
            s.param_work = all_gather(s.bucket.param[lo:hi], 0, self.group, async_op=True,
                                      out=s.bucket.param)  # [n/(dp*cp)] -> [n]
            if not overlap:
                s.param_work.wait()
                s.param_work = None

    def finish_param_sync(self) -> None:
        """Wait for every in-flight param gather (before reading params outside forward, e.g.
        to save a checkpoint)."""
        for s in self._syncs:
            self._wait_param(s)

    @staticmethod
    def _wait_param(s: _BucketSync) -> None:
        if s.param_work is not None:
            s.param_work.wait()
            s.param_work = None

    def _register_param_wait_hooks(self) -> None:
        """Each module waits, right before its forward, for the buckets of its own params."""
        for module in self.module.modules():
            syncs = {id(self._sync_of[p]): self._sync_of[p]
                     for p in module.parameters(recurse=False) if p in self._sync_of}
            if syncs:
                self._hooks.append(module.register_forward_pre_hook(_ParamWait(list(syncs.values()))))


@dataclass
class _ParamWait:
    """Forward pre-hook: block until the param gathers of these buckets have landed."""

    syncs: list[_BucketSync]

    def __call__(self, module, args) -> None:
        for s in self.syncs:
            DistributedDataParallel._wait_param(s)

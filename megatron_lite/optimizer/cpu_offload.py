"""The hybrid device/host optimizer step (Megatron's `--optimizer-cpu-offload`, its
HybridDeviceOptimizer): a leading fraction of the fp32 main params, with their Adam/SGD state,
lives in host memory and is stepped there by torch's fused (vectorized, multi-threaded) CPU
optimizer; the rest is stepped on the device as usual.

Per step, after the outer optimizer has unscaled and clipped every gradient on the device
(the norm needs them all), the host part runs chunk by chunk through pinned staging buffers:
gradients device -> host, host step, fp32 mains cast to the model dtype on the host (half the
bytes of fp32 over PCIe) -> device. With `--overlap-cpu-optimizer-d2h-h2d` the copies run on
two side streams, double-buffered, so chunk c+1's gradients arrive and chunk c-1's params
leave while the host steps chunk c; the device part of the step is queued first and runs
meanwhile. Staging is a few chunks, not a copy of the model: the 128 GB host of a one-GPU
Llama-3-8B run holds the 96 GB of fp32 mains and moments, not another 48 GB of buffers. The
mains and moments themselves stay in pageable memory: every copy goes through the pinned
staging buffers, and pinning ~100 GB of a 128 GB host would starve everything else.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from dataclasses import dataclass

import torch

from megatron_lite.optimizer.core import OptimizerConfig, build_inner_optimizer

_ALIGN = 64  # bytes: each staged tensor starts aligned, whatever its dtype
_MADV_DONTFORK = 10  # <sys/mman.h>, Linux
# Only tensors this large are kept from forks: glibc serves them by mmap (its threshold tops
# out at 32 MiB), so their pages go back to the kernel on free and never carry the flag into
# a later small allocation that a forked child would need.
_NO_FORK_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class OffloadConfig:
    fraction: float = 1.0  # --optimizer-offload-fraction: share of main-param elements on the host
    overlap_d2h_h2d: bool = False  # --overlap-cpu-optimizer-d2h-h2d
    # Elements per staging chunk (256 MB of fp32 gradients); a larger tensor is a chunk alone.
    chunk_elements: int = 1 << 26


@dataclass
class HostUnit:
    """One tensor the host steps: its fp32 main on the host and the device tensor (model param,
    or a slice of a param buffer) its updated value is written into."""

    main: torch.Tensor
    target: torch.Tensor


def offloaded_prefix(numels: list[int], fraction: float) -> int:
    """How many leading units go to the host: the longest prefix whose elements stay within
    `fraction` of the total (Megatron offloads parameters in order up to the fraction)."""
    budget, total = fraction * sum(numels), 0
    for n, k in enumerate(numels):
        if total + k > budget:
            return n
        total += k
    return len(numels)


@torch.no_grad()
def host_copy(target: torch.Tensor, chunk: int = 1 << 26) -> torch.Tensor:
    """The fp32 host main of a device tensor (pageable; see the module docstring), copied in
    chunks: a device-to-host copy that also casts makes a cast copy of its whole source first."""
    out = torch.empty(target.shape, dtype=torch.float32, device="cpu")
    flat_out, flat_in = out.view(-1), target.detach().reshape(-1)
    for start in range(0, flat_in.numel(), chunk):
        flat_out[start:start + chunk].copy_(flat_in[start:start + chunk])
    return out


def exclude_from_forks(t: torch.Tensor) -> None:
    """Keep a large host tensor's pages out of processes forked later (madvise DONTFORK).

    The DataLoader forks its workers at the first training step, when the fp32 host mains
    (32 GB for Llama-3-8B) already exist, so parent and workers share them copy-on-write; the
    first optimizer step then writes every page and the kernel copies each one: another 32 GB
    of host memory that the workers keep for the whole run (the 1-GPU 8B run died of it on a
    128 GB host). The workers never touch optimizer state. Best effort: Linux only, whole
    pages inside the tensor's storage only."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return
    storage = t.untyped_storage()
    if storage.nbytes() < _NO_FORK_MIN_BYTES:
        return
    page = mmap.PAGESIZE
    lo = -(-storage.data_ptr() // page) * page
    hi = (storage.data_ptr() + storage.nbytes()) // page * page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTFORK)


def exclude_host_state_from_forks(optimizer) -> None:
    """`exclude_from_forks` for every host main and host optimizer state tensor of an outer
    optimizer whose inner one is a HybridOptimizer (else nothing); called before the data
    workers start, after a checkpoint may have loaded host moments."""
    inner = getattr(optimizer, "inner", None)
    if not isinstance(inner, HybridOptimizer):
        return
    for unit in inner.units:
        exclude_from_forks(unit.main)
        for value in inner.host_opt.state.get(unit.main, {}).values():
            if isinstance(value, torch.Tensor):
                exclude_from_forks(value)


def _chunks(numels: list[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive unit ranges of at most `limit` elements (a larger unit is a range alone)."""
    out, start, size = [], 0, 0
    for i, n in enumerate(numels):
        if i > start and size + n > limit:
            out.append((start, i))
            start, size = i, 0
        size += n
    if start < len(numels):
        out.append((start, len(numels)))
    return out


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class _Staging:
    """Pinned (on CUDA) byte buffers for one chunk's gradients and updated params, and the
    events that say when a buffer may be reused."""

    def __init__(self, grad_bytes: int, param_bytes: int, pin: bool):
        self.grads = torch.empty(grad_bytes, dtype=torch.uint8, pin_memory=pin)
        self.params = torch.empty(param_bytes, dtype=torch.uint8, pin_memory=pin)
        self.grads_arrived = None  # event after the gradient copies into `grads`
        self.params_left = None  # event after the copies out of `params`

    @staticmethod
    def views(buffer: torch.Tensor, tensors, dtype=None) -> list[torch.Tensor]:
        """`buffer` cut into one view per tensor (same shape; `dtype` or the tensor's)."""
        out, offset = [], 0
        for t in tensors:
            dt = dtype or t.dtype
            nbytes = t.numel() * dt.itemsize
            out.append(buffer[offset:offset + nbytes].view(dt).view(t.shape))
            offset += _padded(nbytes)
        return out


class HybridOptimizer:
    """What MixedPrecisionOptimizer / DistributedOptimizer use as their inner optimizer when
    part of the state is offloaded. It reads like one torch optimizer: `param_groups` (the
    device optimizer's, which the LR scheduler writes and the host copy follows), one `state`
    table for device and host mains (checkpoints), `defaults`, and `step`."""

    def __init__(self, device_groups: dict, host_units: list[tuple[tuple, HostUnit]], cfg: OptimizerConfig,
                 offload: OffloadConfig, device: torch.device):
        self.device, self.offload = torch.device(device), offload
        self.units = [u for _, u in host_units]
        host_groups = {}
        for key, unit in host_units:
            host_groups.setdefault(key, []).append(unit.main)
        self.device_opt = build_inner_optimizer(device_groups, cfg, self.device)
        self.host_opt = build_inner_optimizer(host_groups, cfg, torch.device("cpu"), host=True)
        # One table keyed by main tensor (device and host mains are distinct tensors), so the
        # checkpoint code sees a single optimizer's state.
        self.host_opt.state = self.device_opt.state
        self._ranges = _chunks([u.main.numel() for u in self.units], offload.chunk_elements)
        cuda = self.device.type == "cuda"
        self._overlap = offload.overlap_d2h_h2d and cuda
        # Staging holds one chunk. A unit larger than a chunk (Llama-3-8B's embedding and
        # output layer: 525M elements each) goes through pageable memory instead: staging
        # sized for it would pin 2 x 3 GB, which the pinned allocator rounds up to powers of
        # two (2 x 6 GB), taken from a 128 GB host that already holds 96 GB of state.
        staged = [r for r in self._ranges if not self._oversized(r)] or [(0, 0)]
        grad_bytes = max(sum(_padded(4 * u.main.numel()) for u in self.units[a:b]) for a, b in staged)
        param_bytes = max(sum(_padded(u.target.numel() * u.target.element_size()) for u in self.units[a:b])
                          for a, b in staged)
        # Two buffer sets when copies overlap the host step (double buffering), else one.
        self._staging = [_Staging(grad_bytes, param_bytes, cuda) for _ in range(2 if self._overlap else 1)]
        # Pageable scratch of the oversized units, stepped one at a time: allocated at their
        # first step (after the DataLoader forked: never shared with its workers) and reused,
        # not ~3 GB allocated and page-faulted again every step.
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._d2h = torch.cuda.Stream(self.device) if self._overlap else None
        self._h2d = torch.cuda.Stream(self.device) if self._overlap else None
        self.host_grads: list[torch.Tensor] = []  # set by the outer optimizer before each step

    # ---- the torch-optimizer surface -----------------------------------------------------
    @property
    def param_groups(self):
        return self.device_opt.param_groups

    @property
    def state(self):
        return self.device_opt.state

    @property
    def defaults(self):
        return self.device_opt.defaults

    def host_elements(self) -> int:
        return sum(u.main.numel() for u in self.units)

    @torch.no_grad()
    def step(self) -> None:
        """Step everything; `host_grads`: the host units' device gradients, unscaled and
        clipped, in unit order."""
        if len(self.host_grads) != len(self.units):
            raise RuntimeError(f"{len(self.host_grads)} host gradients for {len(self.units)} host units")
        for dev, host in zip(self.device_opt.param_groups, self.host_opt.param_groups):
            host["lr"], host["weight_decay"] = dev["lr"], dev["weight_decay"]  # the scheduler's values
        try:
            if self._d2h is not None:
                self._d2h.wait_stream(torch.cuda.current_stream(self.device))  # grads are final
            depth = len(self._staging)  # chunks whose gradients are in flight at once
            pending = {c: self._fetch(c) for c in range(min(depth, len(self._ranges)))}
            self.device_opt.step()  # queued before the host work, so the device runs it meanwhile
            self._host_step(pending)
        finally:
            self.host_grads = []

    # ---- the host part -------------------------------------------------------------------
    def _stream(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _oversized(self, r: tuple[int, int]) -> bool:
        """A range that is one unit larger than a staging chunk (see __init__)."""
        a, b = r
        return b - a == 1 and self.units[a].main.numel() > self.offload.chunk_elements

    def _fetch(self, c: int) -> list[torch.Tensor] | None:
        """Start copying chunk c's gradients into its staging buffer; returns the views (None
        for an oversized unit, copied when its turn comes: `_step_oversized`)."""
        a, b = self._ranges[c]
        if self._oversized((a, b)):
            return None
        staging = self._staging[c % len(self._staging)]
        views = _Staging.views(staging.grads, [u.main for u in self.units[a:b]], torch.float32)
        with self._stream(self._d2h):
            for view, grad in zip(views, self.host_grads[a:b]):
                view.copy_(grad, non_blocking=True)  # [numel of the unit] device -> host
            if self._d2h is not None:
                staging.grads_arrived = torch.cuda.Event()
                staging.grads_arrived.record(self._d2h)
        if self.device.type == "cuda" and self._d2h is None:
            torch.cuda.current_stream(self.device).synchronize()  # no overlap: the copy completes here
        return views

    def _store(self, c: int) -> None:
        """Cast chunk c's updated mains to the model dtype on the host and copy them out."""
        a, b = self._ranges[c]
        staging = self._staging[c % len(self._staging)]
        if staging.params_left is not None:
            staging.params_left.synchronize()  # the previous chunk using this buffer has left
        units = self.units[a:b]
        views = _Staging.views(staging.params, [u.target for u in units])
        for view, unit in zip(views, units):
            view.copy_(unit.main)  # fp32 -> model dtype, on the host
        with self._stream(self._h2d):
            for view, unit in zip(views, units):
                unit.target.copy_(view, non_blocking=True)  # host -> device
            if self._h2d is not None:
                staging.params_left = torch.cuda.Event()
                staging.params_left.record(self._h2d)
        if self.device.type == "cuda" and self._h2d is None:
            torch.cuda.current_stream(self.device).synchronize()  # the buffer is reused next chunk

    def _host_step(self, pending: dict) -> None:
        """Step chunk by chunk; `pending`: chunk -> staged gradient views already fetched."""
        depth = len(self._staging)
        for c, (a, b) in enumerate(self._ranges):
            views = pending.pop(c)
            if views is None:
                self._step_oversized(self.units[a], self.host_grads[a])
                if c + depth < len(self._ranges):
                    pending[c + depth] = self._fetch(c + depth)
                continue
            staging = self._staging[c % depth]
            if staging.grads_arrived is not None:
                staging.grads_arrived.synchronize()
            units = self.units[a:b]
            for unit, grad in zip(units, views):
                unit.main.grad = grad
            try:
                self.host_opt.step()  # torch optimizers skip params without a grad: this chunk only
            finally:
                for unit in units:
                    unit.main.grad = None
            if c + depth < len(self._ranges):
                pending[c + depth] = self._fetch(c + depth)  # this chunk's gradient buffer is free
            self._store(c)
        if self._h2d is not None:
            # What runs next on the device (param all-gather, forward) reads the new values.
            torch.cuda.current_stream(self.device).wait_stream(self._h2d)

    def _step_oversized(self, unit: HostUnit, grad: torch.Tensor) -> None:
        """Step one unit larger than a staging chunk through pageable memory: its gradient
        copied down in chunks, the host step, its model-dtype value copied up in chunks.
        Synchronous on the current stream, which orders it after the gradients' producers and
        before the next forward (the side streams never touch this unit)."""
        n, chunk = unit.main.numel(), self.offload.chunk_elements
        grads, values = self._oversized_scratch(unit)
        host_grad, value = grads[:n], values[:n]  # [numel of the unit]
        if value.dtype != unit.target.dtype:  # a unit kept in another dtype than the first one
            value = torch.empty(n, dtype=unit.target.dtype)
        flat_grad = grad.detach().reshape(-1)
        for start in range(0, n, chunk):
            host_grad[start:start + chunk].copy_(flat_grad[start:start + chunk])  # device -> host
        unit.main.grad = host_grad.view_as(unit.main)
        try:
            self.host_opt.step()  # only this unit has a gradient
        finally:
            unit.main.grad = None
        value.copy_(unit.main.view(-1))  # fp32 -> model dtype, on the host
        flat_out = unit.target.view(-1)
        for start in range(0, n, chunk):
            flat_out[start:start + chunk].copy_(value[start:start + chunk])  # host -> device

    def _oversized_scratch(self, unit: HostUnit) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 gradient, model-dtype value) flat host buffers for the largest oversized unit."""
        if self._scratch is None:
            big = [self.units[a] for a, b in self._ranges if self._oversized((a, b))]
            n = max(u.main.numel() for u in big)
            self._scratch = (torch.empty(n, dtype=torch.float32),
                             torch.empty(n, dtype=unit.target.dtype))
        return self._scratch

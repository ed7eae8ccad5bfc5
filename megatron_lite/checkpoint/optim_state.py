"""Optimizer state as global, layout-free checkpoint entries: for every parameter (by global
name) its fp32 main copy and its moments, TP-sharded like the parameter itself (spec §4.3
"fully reshardable"). So a checkpoint saved with or without the distributed optimizer or
FSDP2 (fsdp_state.py), at any DP size, loads into any of them.

The distributed optimizer holds only a flat shard of each bucket; at save time each bucket's
state is assembled over the DP group (one all-reduce of disjoint shards) and at load time each
rank cuts its shard back out. That costs one bucket-state-sized buffer per bucket while saving.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.checkpoint.fsdp_state import FSDPOptimizerState
from megatron_lite.checkpoint.sharded import model_items, wrap
from megatron_lite.optimizer.core import is_adam
from megatron_lite.optimizer.distributed import DistributedOptimizer
from megatron_lite.optimizer.fsdp import FullyShardedOptimizer


def _moment_keys(inner) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq") if is_adam(inner) else ("momentum_buffer",)


def _ensure_state(inner, main: torch.Tensor, keys) -> dict:
    """Zero moments (and step) for a param that never stepped, so loading has storage."""
    state = inner.state[main]
    for k in keys:
        if k not in state:
            state[k] = torch.zeros_like(main)
    if is_adam(inner) and "step" not in state:
        # Fused/capturable device kernels keep `step` beside the param; the CPU kernels (and
        # offloaded mains, stepped by the host optimizer) on the CPU.
        on_device = main.is_cuda and (inner.defaults.get("fused") or inner.defaults.get("capturable"))
        state["step"] = torch.zeros((), dtype=torch.float32, device=main.device if on_device else "cpu")
    return state


def _first_step(inner) -> torch.Tensor | None:
    for state in inner.state.values():
        if "step" in state:
            return state["step"]
    return None


class OptimizerCheckpoint:
    """Builds the entries for saving, or templates for loading plus a `finish()` that moves
    loaded values into the optimizer."""

    def __init__(self, optimizer, chunks, mesh):
        self.opt, self.chunks, self.mesh = optimizer, list(chunks), mesh
        self.keys = _moment_keys(optimizer.inner)
        self.names = {id(p): key for key, p in model_items(self.chunks)}
        self._pending = []  # (bucket shard, full [1+K, n] tensor) to scatter back after a load
        self._fsdp = (FSDPOptimizerState(optimizer, self.keys, self.names, _ensure_state)
                      if isinstance(optimizer, FullyShardedOptimizer) else None)

    # ---- per-parameter optimizer ---------------------------------------------------------
    def _plain(self, for_load: bool) -> dict:
        out, inner = {}, self.opt.inner
        for p, main in zip(self.opt.model_params, self.opt.main_params):
            key = self.names.get(id(p))
            if key is None:
                continue
            state = _ensure_state(inner, main, self.keys) if for_load else inner.state.get(main, {})
            # Saved even when it is the param itself (fp32 training): a distributed optimizer
            # loading this checkpoint reads its main shards from these keys.
            out[f"optimizer.main.{key}"] = wrap(main.data, p, self.mesh)
            for k in self.keys:
                if k in state:
                    out[f"optimizer.{k}.{key}"] = wrap(state[k], p, self.mesh)
        return out

    # ---- distributed optimizer -----------------------------------------------------------
    def _bucket_shards(self):
        """(chunk, buffer, bucket, its shard parts: one, or two with --optimizer-cpu-offload)."""
        parts = {}
        for shard in self.opt.shards:
            parts.setdefault(id(shard.bucket), []).append(shard)
        for chunk in self.opt.chunks:
            for buf in chunk.param_buffers:
                for bucket in buf.buckets:
                    yield chunk, buf, bucket, parts.get(id(bucket), [])

    def _distributed(self, for_load: bool) -> dict:
        out, inner = {}, self.opt.inner
        for chunk, buf, bucket, shards in self._bucket_shards():
            # On the buffer's device even when the state is offloaded: NCCL reduces device tensors.
            full = torch.zeros(1 + len(self.keys), bucket.numel, dtype=torch.float32,
                               device=buf.param_data.device)  # [main + moments, bucket]
            for shard in shards:
                lo = shard.lo - bucket.offset  # this part of the rank's shard inside the bucket
                if for_load:
                    self._pending.append((shard, full, lo))
                    continue
                full[0, lo:lo + shard.main.numel()] = shard.main
                for piece, a, b in shard.slices:
                    state = inner.state.get(piece, {})
                    for j, k in enumerate(self.keys):
                        if k in state:
                            full[1 + j, lo + a:lo + b] = state[k]
            if not for_load and chunk.shard_world > 1:
                dist.all_reduce(full, group=chunk.group)  # shards are disjoint: SUM assembles
            for p in bucket.params:
                key = self.names.get(id(p))
                start, end = buf.param_range[p]
                s, e = start - bucket.offset, end - bucket.offset
                out[f"optimizer.main.{key}"] = wrap(full[0, s:e].view(p.shape), p, self.mesh)
                for j, k in enumerate(self.keys):
                    out[f"optimizer.{k}.{key}"] = wrap(full[1 + j, s:e].view(p.shape), p, self.mesh)
        return out

    # ---- public --------------------------------------------------------------------------
    def entries(self, for_load: bool) -> dict:
        distributed = isinstance(self.opt, DistributedOptimizer)
        if self._fsdp is not None:
            out = self._fsdp.entries(for_load)
        else:
            out = self._distributed(for_load) if distributed else self._plain(for_load)
        if for_load and distributed:
            for shard in self.opt.shards:
                for piece, _, _ in shard.slices:
                    _ensure_state(self.opt.inner, piece, self.keys)
        step = _first_step(self.opt.inner)
        if step is not None:
            out["optimizer.step"] = step
        return out

    @torch.no_grad()
    def finish_load(self) -> None:
        inner = self.opt.inner
        step = _first_step(inner)
        for state in inner.state.values():
            if "step" in state and step is not None:
                state["step"].copy_(step)
        for shard, full, lo in self._pending:
            shard.main.copy_(full[0, lo:lo + shard.main.numel()])
            for piece, a, b in shard.slices:
                for j, k in enumerate(self.keys):
                    inner.state[piece][k].copy_(full[1 + j, lo + a:lo + b])
            if shard.owns_main:
                shard.buffer.param_data[shard.lo:shard.hi].copy_(shard.main)
        self._pending.clear()
        if self._fsdp is not None:
            self._fsdp.finish_load()
        elif not isinstance(self.opt, DistributedOptimizer):
            for p, main in zip(self.opt.model_params, self.opt.main_params):
                if main is not p:
                    p.copy_(main)

    @torch.no_grad()
    def refresh_main_from_model(self) -> None:
        """Without optimizer state, fp32 main params are re-derived from the loaded weights
        (FSDP2: the weights were loaded into the fp32 shards, nothing to do)."""
        if self._fsdp is not None:
            return
        if isinstance(self.opt, DistributedOptimizer):
            for shard in self.opt.shards:
                if shard.owns_main:
                    shard.main.copy_(shard.buffer.param_data[shard.lo:shard.hi])
            return
        for p, main in zip(self.opt.model_params, self.opt.main_params):
            if main is not p:
                main.copy_(p)

"""Ring attention (`--cp-comm-type p2p`, spec §9.2): K/V blocks travel around the CP ring
while each rank attends its queries to the block it holds; partial outputs merge with
log-sum-exp weights.

Causal load balance with the zig-zag split (split.py): at step i rank r holds the K/V of rank
src = (r - i) mod CP.
- i = 0: its own block, causal (the local order is increasing, so the mask is the plain one);
- src < r: both local query chunks come after the *first* K/V chunk and before the second:
  full queries x first half of K/V, no mask;
- src > r: only the local *second* query chunk comes after any of them: second half of the
  queries x all of K/V, no mask.
So every rank does the same work at every step. The next block's transfer is posted before
the current block's kernel runs (two buffers), so it travels under the compute (LightSeq,
Li et al. 2023; TE's AttnFuncWithCPAndKVP2P).

Backward circulates K/V the same way, together with a dK/dV accumulator that collects each
rank's contribution to that block and arrives back at its owner after CP steps; every block
gradient uses the merged output and LSE (kernels.py), so the sums are exact.
"""
from __future__ import annotations

import torch

from megatron_lite.context_parallel.comm import DKV_TAG, KV_TAG, CPComm, ring_exchange, wait_all
from megatron_lite.context_parallel.kernels import BlockKernel, merge_


def _block_plan(step: int, comm: CPComm, c: int):
    """(causal, query slice, key slice) of ring step `step` on this rank (module docstring)."""
    src = (comm.index - step) % comm.size
    full = slice(None)
    if step == 0:
        return True, full, full
    if src < comm.index:
        return False, full, slice(0, c)
    return False, slice(c, None), full


def ring_forward(q, k, v, comm: CPComm, kernel: BlockKernel):
    """q `[b, np, 2c, d]`, k/v `[b, ng, 2c, d]` -> (out like q, lse `[b, np, 2c]` fp32, the
    blocks' dropout rng states for backward)."""
    c = q.shape[2] // 2
    bufs = [torch.stack([k, v]), None]  # [2, b, ng, 2c, d]: K and V travel as one message
    out = lse = None
    rngs = []
    for step in range(comm.size):
        kv = bufs[step % 2]
        pending = []
        if step + 1 < comm.size:  # post the next block's transfer before this block's kernel
            if bufs[(step + 1) % 2] is None:
                bufs[(step + 1) % 2] = torch.empty_like(kv)
            pending = ring_exchange(comm, kv, bufs[(step + 1) % 2], KV_TAG)
        causal, rows, keys = _block_plan(step, comm, c)
        o, o_lse, rng = kernel.forward(q[:, :, rows], kv[0, :, :, keys], kv[1, :, :, keys], causal)
        rngs.append(rng)
        if step == 0:
            out, lse = o.float(), o_lse.float().clone()  # [b, np, 2c, d], [b, np, 2c]
        else:
            merge_(out[:, :, rows], lse[:, :, rows], o, o_lse)
        wait_all(pending)
    return out.to(q.dtype), lse, rngs


def ring_backward(dout, q, k, v, out, lse, rngs, comm: CPComm, kernel: BlockKernel):
    """Gradients (dq, dk, dv) of `ring_forward` given its merged `out` and `lse`."""
    c = q.shape[2] // 2
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [b, np, 2c, d]
    bufs = [torch.stack([k, v]), None]
    dkv_in, dkv_pending, dkv_sent = None, [], None
    for step in range(comm.size):
        kv = bufs[step % 2]
        kv_pending = []
        if step + 1 < comm.size:
            if bufs[(step + 1) % 2] is None:
                bufs[(step + 1) % 2] = torch.empty_like(kv)
            kv_pending = ring_exchange(comm, kv, bufs[(step + 1) % 2], KV_TAG)
        causal, rows, keys = _block_plan(step, comm, c)
        dq_b, dk_b, dv_b = kernel.backward(dout[:, :, rows], q[:, :, rows], kv[0, :, :, keys],
                                           kv[1, :, :, keys], out[:, :, rows], lse[:, :, rows], causal,
                                           rngs[step])
        dq[:, :, rows] += dq_b
        # This rank's contribution to the block of rank (r - step), in fp32 so that CP
        # partial sums do not round at every hop: [2, b, ng, 2c, d].
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        dkv[0, :, :, keys] = dk_b
        dkv[1, :, :, keys] = dv_b
        if step > 0:  # the accumulator of this block, from the previous rank
            wait_all(dkv_pending)
            dkv += dkv_in
        dkv_in = torch.empty_like(dkv)
        # After the last step the accumulator goes home: rank r + 1 owns block r - (CP - 1).
        # `dkv_sent` keeps the buffer alive until its send was waited.
        dkv_pending, dkv_sent = ring_exchange(comm, dkv, dkv_in, DKV_TAG), dkv
        wait_all(kv_pending)
    wait_all(dkv_pending)
    del dkv_sent
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)

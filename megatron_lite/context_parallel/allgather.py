"""All-gather attention (`--cp-comm-type all_gather`, spec §9.2): every rank gathers the
whole sequence's K/V, attends its two query chunks, and in backward reduce-scatters dK/dV
back to their owners. Not overlapped, but only K/V (GQA heads, un-repeated) travel.

Query chunk j (global chunk index) sees keys [0, j·c) fully and chunk j causally. The two
parts run as separate kernels (a rectangular unmasked block and a square causal block)
merged by LSE, so no kernel ever has to interpret a non-square causal mask (whose alignment
differs between kernels). The gathered K/V is not kept for backward; it is gathered again,
which trades one all-gather for `[s, b, ng, d]` of memory per layer.
"""
from __future__ import annotations

import torch

from megatron_lite.context_parallel.comm import CPComm
from megatron_lite.context_parallel.kernels import BlockKernel, merge_
from megatron_lite.context_parallel.split import chunk_ids
from megatron_lite.tensor_parallel.collectives import all_gather, reduce_scatter


def _gather_kv(k, v, comm: CPComm) -> torch.Tensor:
    """Local K/V `[b, ng, 2c, d]` -> the whole sequence's `[2, b, ng, s, d]` in natural order."""
    kv = torch.stack([k, v]).unsqueeze(0)  # [1, 2, b, ng, 2c, d]
    parts = all_gather(kv, 0, comm.group)  # [cp, 2, b, ng, 2c, d] in group order
    c = k.shape[2] // 2
    first = [parts[t, :, :, :, :c] for t in range(comm.size)]
    second = [parts[t, :, :, :, c:] for t in reversed(range(comm.size))]
    return torch.cat(first + second, dim=3)  # [2, b, ng, s, d]


def _parts(comm: CPComm, c: int):
    """For each local query half: (half index, key range of its causal block, prefix length)."""
    ids = chunk_ids(comm.size, comm.index)
    return [(half, slice(j * c, (j + 1) * c), j * c) for half, j in enumerate(ids)]


def allgather_forward(q, k, v, comm: CPComm, kernel: BlockKernel):
    """q `[b, np, 2c, d]`, k/v `[b, ng, 2c, d]` -> (out like q, lse `[b, np, 2c]` fp32, the
    blocks' dropout rng states: causal and prefix block of each half)."""
    c = q.shape[2] // 2
    kv = _gather_kv(k, v, comm)
    outs, lses, rngs = [], [], []
    for half, diag, prefix in _parts(comm, c):
        qh = q[:, :, half * c:(half + 1) * c]
        o, lse, rng = kernel.forward(qh, kv[0, :, :, diag], kv[1, :, :, diag], True)
        o, lse = o.float(), lse.float().clone()
        rngs.append(rng)
        if prefix:
            po, plse, rng = kernel.forward(qh, kv[0, :, :, :prefix], kv[1, :, :, :prefix], False)
            merge_(o, lse, po, plse)
        rngs.append(rng if prefix else None)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2), rngs


def allgather_backward(dout, q, k, v, out, lse, rngs, comm: CPComm, kernel: BlockKernel):
    c = q.shape[2] // 2
    kv = _gather_kv(k, v, comm)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # [2, b, ng, s, d]
    dqs = []
    for half, diag, prefix in _parts(comm, c):
        rows = slice(half * c, (half + 1) * c)
        args = (dout[:, :, rows], q[:, :, rows])
        dq, dk, dv = kernel.backward(*args, kv[0, :, :, diag], kv[1, :, :, diag], out[:, :, rows],
                                     lse[:, :, rows], True, rngs[2 * half])
        dq = dq.float()
        dkv[0, :, :, diag] += dk
        dkv[1, :, :, diag] += dv
        if prefix:
            pdq, pdk, pdv = kernel.backward(*args, kv[0, :, :, :prefix], kv[1, :, :, :prefix],
                                            out[:, :, rows], lse[:, :, rows], False, rngs[2 * half + 1])
            dq += pdq
            dkv[0, :, :, :prefix] += pdk
            dkv[1, :, :, :prefix] += pdv
        dqs.append(dq)
    # Back to group order (member t owns chunks t and 2cp-1-t), then each keeps the sum of its own.
    chunks = dkv.chunk(2 * comm.size, dim=3)
    by_member = torch.stack([torch.cat([chunks[t], chunks[2 * comm.size - 1 - t]], dim=3)
                             for t in range(comm.size)])  # [cp, 2, b, ng, 2c, d]
    mine = reduce_scatter(by_member, 0, comm.group)[0]  # [2, b, ng, 2c, d]
    return torch.cat(dqs, dim=2).to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)

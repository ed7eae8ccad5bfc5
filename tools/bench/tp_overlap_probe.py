"""Which way of overlapping the sequence-parallel collectives with their GEMMs wins on this
machine, at GPT 1.3B's TP2 shapes (issue 13). Times each variant of both fused operations
and checks it against the plain one:

  all-gather + GEMM (column-parallel forward), `[T/tp, h] -> [T, n]`:
    nccl        all_gather_into_tensor, then one GEMM (what runs today)
    nccl-split  the shard in 2 row halves, 2 async all-gathers, each half's GEMM as it lands
    symm-fused  torch.ops.symm_mem.fused_all_gather_matmul
    ce          symmetric memory: the own shard's GEMM while the copy engine pulls the peers'
                shards (no SMs taken from the GEMM), then theirs
  GEMM + reduce-scatter (row-parallel forward), `[T, k] -> [T/tp, n]`:
    nccl        one GEMM, then reduce_scatter_tensor
    symm-fused  torch.ops.symm_mem.fused_matmul_reduce_scatter
    ce          the peers' row blocks first, each pushed into its owner's symmetric buffer by
                the copy engine while the next GEMM runs; then the own block, plus the pushes

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=. \\
    torchrun --nproc_per_node 2 tools/bench/tp_overlap_probe.py [--tokens 8192 --hidden 2048]

--tokens is s*b of one micro-batch (2048 x 4). Prints one line per (operation, shape,
variant): mean ms over 20 runs between CUDA events, and the max abs difference from `nccl`.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tools.bench.nccl_probe import time_ms


class Probe:
    def __init__(self, group):
        import torch.distributed._symmetric_memory as symm_mem

        self.symm_mem, self.group = symm_mem, group
        self.name = group.group_name
        self.rank, self.tp = dist.get_rank(group), dist.get_world_size(group)
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.name)  # needed by older torch, a no-op later
        self.side = torch.cuda.Stream(priority=-1)

    # ---- all-gather + GEMM: x [T/tp, h], w [n, h] -> [T, n] ------------------------------
    def ag_nccl(self, x, w):
        full = x.new_empty(x.size(0) * self.tp, x.size(1))
        dist.all_gather_into_tensor(full, x, group=self.group)
        return full @ w.t()

    def ag_nccl_split(self, x, w):
        halves, rows = x.chunk(2), x.size(0)
        out = x.new_empty(self.tp, 2, rows // 2, w.size(0))  # [rank, half, rows/2, n]
        gathered, works = [], []
        for h in halves:
            g = h.new_empty(self.tp, h.size(0), h.size(1))
            works.append(dist.all_gather_into_tensor(g, h.contiguous(), group=self.group, async_op=True))
            gathered.append(g)
        for i, (g, work) in enumerate(zip(gathered, works)):
            work.wait()
            out[:, i] = g @ w.t()  # rows of every rank's half i, back in sequence order
        return out.view(-1, w.size(0))

    def ag_symm_fused(self, x, w):
        _, outs = torch.ops.symm_mem.fused_all_gather_matmul(x, [w.t()], 0, self.name)
        return outs[0]

    def ag_ce(self, x, w):
        ws = self.symm_mem.get_symm_mem_workspace(self.name, x.numel() * x.element_size())
        rows, n = x.size(0), w.size(0)
        out = x.new_empty(rows * self.tp, n)
        ws.barrier(channel=0)  # the peers have finished reading the previous contents
        ws.get_buffer(self.rank, x.shape, x.dtype).copy_(x)
        ws.barrier(channel=1)  # every shard is in place
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        pulled = {}
        with torch.cuda.stream(self.side):
            for step in range(1, self.tp):
                peer = (self.rank + step) % self.tp
                pulled[peer] = torch.empty_like(x)
                pulled[peer].copy_(ws.get_buffer(peer, x.shape, x.dtype))  # copy engine over NVLink
        torch.mm(x, w.t(), out=out[self.rank * rows:(self.rank + 1) * rows])
        current.wait_stream(self.side)
        for peer, shard in pulled.items():
            shard.record_stream(current)
            torch.mm(shard, w.t(), out=out[peer * rows:(peer + 1) * rows])
        return out

    # ---- GEMM + reduce-scatter: x [T, k], w [n, k] -> [T/tp, n] --------------------------
    def rs_nccl(self, x, w):
        y = x @ w.t()
        out = y.new_empty(y.size(0) // self.tp, y.size(1))
        dist.reduce_scatter_tensor(out, y, group=self.group)
        return out

    def rs_symm_fused(self, x, w):
        return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w.t(), "sum", 0, self.name)

    def rs_ce(self, x, w):
        rows = x.size(0) // self.tp
        shape = (self.tp, rows, w.size(0))  # slot j of rank r's buffer: rank j's partial of r's rows
        ws = self.symm_mem.get_symm_mem_workspace(self.name, x.element_size() * self.tp * rows * w.size(0))
        ws.barrier(channel=0)  # the owners have finished reading the previous pushes
        current = torch.cuda.current_stream()
        for step in range(1, self.tp):
            peer = (self.rank + step) % self.tp
            part = x[peer * rows:(peer + 1) * rows] @ w.t()  # the peer's rows, this rank's partial
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                ws.get_buffer(peer, shape, x.dtype)[self.rank].copy_(part)  # pushed by the copy engine
            part.record_stream(self.side)
        out = x[self.rank * rows:(self.rank + 1) * rows] @ w.t()
        current.wait_stream(self.side)
        ws.barrier(channel=1)  # every peer's push into this rank's buffer has landed
        mine = ws.get_buffer(self.rank, shape, x.dtype)
        for step in range(1, self.tp):
            out += mine[(self.rank + step) % self.tp]
        return out


def _report(probe, what, shape, variants, args, rank):
    ref = variants["nccl"](*args)
    for name, fn in variants.items():
        try:
            err = (fn(*args).float() - ref.float()).abs().max().item()
            ms = time_ms(lambda fn=fn: fn(*args))
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
            if rank == 0:
                why = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"{what:9s} {shape:22s} {name:11s} failed: {why}", flush=True)
            continue
        if rank == 0:
            print(f"{what:9s} {shape:22s} {name:11s} {ms:7.3f} ms  max|diff| {err:.3g}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="s*b of one micro-batch")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    a = p.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group = dist.new_group(list(range(dist.get_world_size())))
    probe, tp, rank = Probe(group), dist.get_world_size(), dist.get_rank()
    torch.manual_seed(1234 + rank)
    bf16 = dict(dtype=torch.bfloat16, device=device)
    h, t = a.hidden, a.tokens
    for n in (3 * h // tp, a.ffn // tp):  # QKV, FC1
        x, w = torch.randn(t // tp, h, **bf16), torch.randn(n, h, **bf16) / h ** 0.5
        variants = {"nccl": probe.ag_nccl, "nccl-split": probe.ag_nccl_split,
                    "symm-fused": probe.ag_symm_fused, "ce": probe.ag_ce}
        _report(probe, "ag+gemm", f"[{t // tp},{h}]x[{n},{h}]", variants, (x, w), rank)
    for k in (h // tp, a.ffn // tp):  # attention projection, FC2
        x, w = torch.randn(t, k, **bf16), torch.randn(h, k, **bf16) / k ** 0.5
        variants = {"nccl": probe.rs_nccl, "symm-fused": probe.rs_symm_fused, "ce": probe.rs_ce}
        _report(probe, "gemm+rs", f"[{t},{k}]x[{h},{k}]", variants, (x, w), rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The transfers of `--tp-comm-overlap` by the GPUs' copy engines, through PyTorch's symmetric
memory, for a TP group inside one node (overlap.py picks this path on CUDA).

NCCL moves data with kernels that take SMs from the GEMMs they are meant to hide behind, and
in training its all-gathers ran at a third of their isolated speed (issue 13: 240 vs 90 us for
32 MiB on 2xH200). Here every rank exposes its chunk in a symmetric buffer that the peers map
over NVLink, and a copy on a side stream, which the copy engine executes, pulls a peer's
chunk (all-gather) or pushes a partial sum into its owner's buffer (reduce-scatter) while the
current stream multiplies another chunk. Same decomposition as the p2p ring of overlap.py,
with direct transfers instead of ring hops (every peer is one NVLink hop away).

The buffer is the group's symmetric workspace (`get_symm_mem_workspace`, cached by torch per
group name), in three equal regions. Device-side barriers order each use; they are kernels on
the current stream, so they order against the compute queued around them without a host sync,
but each makes a GPU wait for its peers. After its writes every operation has one: every
chunk is in place. Before them, a FENCED operation has another: every rank has finished
reading what the previous operation left there. Operations in regions FIRST and SECOND skip
that one when they alternate (never twice in a row in the same region): the use of a region
before the current one is two operations back, and its readers finished it before reaching
the barrier of the operation between, which this rank has passed. Inside a transformer layer
the SP linears give that order by construction (layers.py: column forward FIRST, row forward
SECOND, row backward FIRST, column backward SECOND, and a layer's forward and backward both
start in FIRST and end in SECOND); anything else runs FENCED.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

# Workspace regions (module docstring): FIRST and SECOND alternate, FENCED stands alone.
FIRST, SECOND, FENCED = 0, 1, 2
_REGIONS, _ALIGN = 3, 256


def usable(x: torch.Tensor, group) -> bool:
    """Whether the copy-engine path serves `group` for `x`: CUDA, NCCL, torch's symmetric
    memory, and every rank of the group on this node (by torchrun's LOCAL_WORLD_SIZE: the
    same answer on every rank, so no rank takes another path than its peers)."""
    if not x.is_cuda or dist.get_backend(group) != dist.Backend.NCCL:
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local < 1:
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401 - present in CUDA builds
    except ImportError:
        return False
    nodes = {r // local for r in dist.get_process_group_ranks(group)}
    return len(nodes) == 1


def _workspace(group, nbytes: int):
    """The group's symmetric workspace of at least `nbytes`. Growing it frees the old buffer,
    which a peer's copy engine may still be reading from the previous operation (the hosts run
    ahead of the GPUs): every rank first waits for its GPU and for the others, once. Callers
    ask for the same size for an all-gather and a reduce-scatter of one layer, so a run grows
    it at its first call only."""
    import torch.distributed._symmetric_memory as symm_mem

    name = group.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        symm_mem.enable_symm_mem_for_group(name)  # required by torch 2.11, idempotent
    current = getattr(symm_mem, "_group_name_to_workspace_tensor", {}).get(name)
    too_small = current is None or current.numel() * current.element_size() < nbytes
    if too_small and torch.cuda.is_current_stream_capturing():
        # Growing needs a host sync and a barrier, neither capturable; the eager warm-up
        # iterations before a capture run the same shapes, so this means a shape changed.
        raise RuntimeError(f"--tp-comm-overlap: the symmetric workspace of group {name} must "
                           f"grow to {nbytes} bytes inside a CUDA graph capture")
    if current is not None and too_small:
        torch.cuda.synchronize()
        dist.barrier(group=group)
        torch.cuda.synchronize()
    return symm_mem.get_symm_mem_workspace(name, nbytes)


def _region(group, nbytes: int, region: int, dtype: torch.dtype):
    """(workspace, element offset of `region` for `dtype`), the workspace grown so that each
    of its regions holds `nbytes`. The region size follows the workspace's (the same on every
    rank, which asks for the same sizes in the same order)."""
    ws = _workspace(group, _REGIONS * (-(-nbytes // _ALIGN) * _ALIGN))
    region_bytes = ws.buffer_size // _REGIONS // _ALIGN * _ALIGN
    return ws, region * region_bytes // dtype.itemsize


def gather_chunks(x: torch.Tensor, group, into: Callable[[int], torch.Tensor],
                  region: int = FENCED) -> Iterator[tuple[int, torch.Tensor]]:
    """All-gather by pulls: yields (owner, chunk) once the chunk is in `into(owner)` (this
    rank's own first, copied there unless `into` returns x itself; then each peer's), so the
    caller can use one chunk while the next is pulled. x: this rank's chunk; `into(owner)`:
    a tensor of x's shape and dtype; `region`: of the workspace (module docstring)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    # As large as a reduce-scatter of the same chunk needs: one size for the whole layer.
    ws, at = _region(group, size * x.numel() * x.element_size(), region, x.dtype)
    current = torch.cuda.current_stream(x.device)
    side = torch.cuda.Stream(x.device, priority=-1)
    if region == FENCED:
        ws.barrier(channel=0)  # every peer has finished pulling the previous contents
    ws.get_buffer(rank, x.shape, x.dtype, at).copy_(x)
    ws.barrier(channel=1)  # every rank's chunk is in place
    # Destinations allocated here, on the current stream, which consumes them after waiting
    # for the pulls: the allocator never hands them to the side stream's later work.
    peers = [(rank + step) % size for step in range(1, size)]
    targets = {peer: into(peer) for peer in peers}
    side.wait_stream(current)
    arrived = []
    with torch.cuda.stream(side):
        for peer in peers:
            targets[peer].copy_(ws.get_buffer(peer, x.shape, x.dtype, at))  # by the copy engine
            done = torch.cuda.Event()
            done.record(side)
            arrived.append((peer, done))
    own = into(rank)
    if own.data_ptr() != x.data_ptr():
        own.copy_(x)
    yield rank, own
    for peer, done in arrived:
        current.wait_event(done)
        yield peer, targets[peer]


def reduce_scatter_parts(part: Callable[[int], torch.Tensor], shape, dtype, device, group,
                         region: int = FENCED) -> torch.Tensor:
    """Reduce-scatter by pushes: `part(c)` computes this rank's partial sum of chunk c (on the
    current stream); each peer's is pushed into its owner's slot while the next one computes,
    and this rank's own chunk is summed with what the peers pushed. Returns `shape`.
    `region`: of the workspace (module docstring)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    slots_shape = (size,) + tuple(shape)  # slot j of rank c's buffer: rank j's partial of chunk c
    ws, at = _region(group, size * torch.Size(shape).numel() * dtype.itemsize, region, dtype)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device, priority=-1)
    if region == FENCED:
        ws.barrier(channel=0)  # every owner has finished reading the previous pushes
    for step in range(1, size):
        owner = (rank + step) % size
        p = part(owner)  # [shape]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            ws.get_buffer(owner, slots_shape, dtype, at)[rank].copy_(p)  # by the copy engine
        p.record_stream(side)
    out = part(rank)
    current.wait_stream(side)
    ws.barrier(channel=1)  # every peer's push into this rank's slots has landed
    mine = ws.get_buffer(rank, slots_shape, dtype, at)
    for j in range(size):  # a fixed order: the same sum whatever the rank
        if j != rank:
            out.add_(mine[j])
    return out

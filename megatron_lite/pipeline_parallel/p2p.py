"""Point-to-point links between neighbouring pipeline stages.

Each pipeline gets one two-rank process group per direction and kind: `act[r]` carries
activations from pp rank r to r+1, `grad[r]` carries gradients from r+1 back to r (with
virtual stages the links wrap around: the last rank feeds chunk c+1 of rank 0, spec §6.2).
A channel is a FIFO in one direction, and a schedule sends and receives the messages of one
channel in the same order on both ends (schedule tests check it), so any interleaving of
posts is deadlock free, prefetched receives (`--overlap-p2p-comm`) included. Megatron instead
batches each step's sends and receives on the single pipeline group (`batch_isend_irecv`)
so that NCCL, which serialises a communicator's operations on one stream, never sees two
ranks each waiting in a send; separate channels remove that coupling without requiring the
send/recv pairs to line up step by step.

Shapes are known in advance (`[s/cp(/tp with SP), b, h]`, the same for every micro-batch), so
receives allocate their buffer without a shape handshake (spec §6.2).

Headers. The dynamic schedule (`--use-dpp`, dynamic_executor.py) announces each message with a
small int64 header that travels on the host: in a dynamic run every NCCL link has a gloo twin
(on a gloo world the link itself serves, headers set apart by their tag), so a header can be
sent and received without launching a GPU kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite.pipeline_parallel.schedules import ACT, GRAD

# Tag of header messages: on a gloo world they share the link with the payloads (tag 0), and
# gloo matches sends to receives per tag, so the two streams stay apart.
_HEADER_TAG = 1


@dataclass
class PipelineChannels:
    pp_rank: int
    pp_size: int
    # (kind, lower pp rank r of the link r <-> r+1) -> (group, global rank of r, global rank of r+1)
    links: dict = field(default_factory=dict)
    # Same keys -> (gloo group, a, b) for headers: the gloo twin of an NCCL link, else the link.
    header_links: dict = field(default_factory=dict)
    _owned: list = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, ps, ring: bool, backend: str | None = None, dynamic: bool = False,
               header_twins: bool | None = None) -> PipelineChannels:
        """Collective over the whole world (every rank creates every group). `ring`: also link
        the last rank back to the first (needed by the interleaved schedule). `dynamic`: the
        run sends headers (--use-dpp). `header_twins`: headers on gloo groups of their own
        (default: for a dynamic run over NCCL links; tests ask for them on gloo to run that
        layout on CPU). A static run creates no twins: they would be idle gloo groups."""
        out = cls(ps.pp_rank, ps.pp_size)
        pp = ps.pp_size
        if pp == 1:
            return out
        mine = ps.ranks["pp"]  # this rank's pipeline
        # The same answer on every rank, so every rank creates the same groups in the same order.
        twins = header_twins
        if twins is None:
            twins = dynamic and "nccl" in str(backend or dist.get_backend()).lower()
        options = ps.pg_options("pp", backend)  # Megatron's "pp" settings: its p2p runs on that group
        for pipeline in ps.grid.groups("pp"):
            for r in range(pp if ring else pp - 1):
                a, b = pipeline[r], pipeline[(r + 1) % pp]
                for kind in (ACT, GRAD):
                    group = dist.new_group(sorted({a, b}), backend=backend, timeout=ps.timeout,
                                           pg_options=options)
                    out._owned.append(group)
                    twin = group
                    if twins:
                        twin = dist.new_group(sorted({a, b}), backend="gloo", timeout=ps.timeout)
                        out._owned.append(twin)
                    if pipeline == mine and ps.rank in (a, b):
                        out.links[(kind, r)] = (group, a, b)
                        out.header_links[(kind, r)] = (twin, a, b)
        out._warm_up()
        return out

    def _warm_up(self) -> None:
        # NCCL creates a communicator on its first operation, blocking until both ranks get
        # there; one tiny exchange per link in a fixed global order keeps that from deadlocking
        # when the schedule's first uses come in different orders on the two ends.
        if not self.links or dist.get_backend(next(iter(self.links.values()))[0]) != "nccl":
            return
        device = torch.device("cuda", torch.cuda.current_device())
        for key in sorted(self.links):
            group, a, b = self.links[key]
            t = torch.zeros(1, device=device)
            me = dist.get_rank()
            dist.send(t, b, group=group) if me == a else dist.recv(t, a, group=group)

    def _link(self, kind: str, sender: int, receiver: int, links: dict | None = None):
        """The group carrying `kind` from pp rank `sender` to pp rank `receiver` (from `links`,
        default the payload links), and the global rank of the other end (seen from this rank)."""
        pp = self.pp_size
        low = sender if kind == ACT else receiver  # activations flow r -> r+1, grads r+1 -> r
        if (low + 1) % pp != (receiver if kind == ACT else sender):
            raise ValueError(f"no {kind} link from pp rank {sender} to {receiver}")
        group, a, b = (self.links if links is None else links)[(kind, low)]
        ends = {low: a, (low + 1) % pp: b}
        peer = receiver if self.pp_rank == sender else sender
        return group, ends[peer]

    def isend(self, tensor: torch.Tensor, kind: str, to_pp_rank: int):
        group, peer = self._link(kind, self.pp_rank, to_pp_rank)
        return dist.isend(tensor, peer, group=group)

    def irecv(self, buffer: torch.Tensor, kind: str, from_pp_rank: int):
        group, peer = self._link(kind, from_pp_rank, self.pp_rank)
        return dist.irecv(buffer, peer, group=group)

    def isend_header(self, header: torch.Tensor, kind: str, to_pp_rank: int):
        """Send a CPU int64 header on the host (gloo) for the `kind` link to `to_pp_rank`."""
        group, peer = self._link(kind, self.pp_rank, to_pp_rank, self.header_links)
        return dist.isend(header, peer, group=group, tag=_HEADER_TAG)

    def irecv_header(self, header: torch.Tensor, kind: str, from_pp_rank: int):
        group, peer = self._link(kind, from_pp_rank, self.pp_rank, self.header_links)
        return dist.irecv(header, peer, group=group, tag=_HEADER_TAG)

    def destroy(self) -> None:
        for group in self._owned:
            dist.destroy_process_group(group)
        self._owned.clear()
        self.links.clear()
        self.header_links.clear()

"""ParallelState: this rank's coordinates and the process groups of one parallel layout.

An explicit object instead of Megatron's module globals (DESIGN rule 1): tests can build
several layouts in one process, and library code receives the state it works in.
Collective helpers elsewhere treat a size-1 axis as "no communication", so a ParallelState
for a single process works without torch.distributed being initialized.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from megatron_lite.context_parallel.comm import CPComm
from megatron_lite.distributed.nccl_config import nccl_options
from megatron_lite.distributed.rank_grid import (
    DEFAULT_ORDER,
    RankGrid,
    embedding_groups,
    hierarchical_cp_groups,
    position_embedding_groups,
)

# Group tokens created for every layout; names follow spec §5.2.
_GROUP_TOKENS = ("tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-cp", "tp-dp-cp", "tp-dp")


@dataclass
class ParallelState:
    grid: RankGrid
    rank: int
    groups: dict = field(default_factory=dict)  # token -> ProcessGroup (None when size 1 / no dist)
    ranks: dict = field(default_factory=dict)  # token -> list of global ranks of this rank's group
    embedding_group: object = None
    embedding_ranks: list = field(default_factory=list)
    position_embedding_group: object = None
    position_embedding_ranks: list = field(default_factory=list)
    # --distributed-timeout-minutes for every group this layout makes: torch's new_group does
    # not inherit the world's timeout (it would keep its 30-minute default).
    timeout: timedelta | None = None
    # token -> gloo twin of this rank's group (create_cpu_groups), for host-side agreement
    cpu_groups: dict = field(default_factory=dict)
    # --nccl-communicator-config-path: token -> NCCL options for that group (nccl_config.py)
    nccl_comm_cfgs: dict = field(default_factory=dict)
    _owned: list = field(default_factory=list, repr=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        order: str = DEFAULT_ORDER,
        tied_embeddings: bool = True,
        backend: str | None = None,
        hierarchical_cp: tuple[int, ...] | None = None,
        timeout: timedelta | None = None,
        nccl_comm_cfgs: dict | None = None,
    ) -> ParallelState:
        """Build every group for this layout. Collective: all ranks of the world must call it.
        `hierarchical_cp`: `--hierarchical-context-parallel-sizes` (inner, outer), for a2a+p2p.
        `nccl_comm_cfgs`: {group token: NCCL options} (nccl_config.load_nccl_comm_config)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        model_parallel = tp * pp * cp
        if world % model_parallel:
            raise ValueError(
                f"world size ({world}) is not divisible by tensor ({tp}) x pipeline ({pp}) "
                f"x context ({cp}) parallel sizes"
            )
        grid = RankGrid(tp=tp, cp=cp, dp=world // model_parallel, pp=pp, order=order)
        state = cls(grid=grid, rank=rank, timeout=timeout, nccl_comm_cfgs=dict(nccl_comm_cfgs or {}))
        for token in _GROUP_TOKENS:
            state.groups[token], state.ranks[token] = state._new_groups(grid.groups(token), backend,
                                                                        token=token)
        # Whole-job agreements (timers, signals, checkpoint barriers, ZeRO-1 norms) get a group of
        # their own too, so they carry --distributed-timeout-minutes (DESIGN rule 11).
        state.groups["world"], state.ranks["world"] = state._new_groups([list(range(world))], backend)
        if hierarchical_cp and len(hierarchical_cp) > 1:
            inners, outers = hierarchical_cp_groups(grid.groups("cp"), hierarchical_cp[0])
            for token, groups in (("cp-inner", inners), ("cp-outer", outers)):
                state.groups[token], state.ranks[token] = state._new_groups(groups, backend, token=token)
        pipelines = grid.groups("pp")
        state.embedding_group, state.embedding_ranks = state._new_groups(
            embedding_groups(pipelines, tied=tied_embeddings), backend, only_members=True, token="embedding"
        )
        state.position_embedding_group, state.position_embedding_ranks = state._new_groups(
            position_embedding_groups(pipelines), backend, only_members=True, token="position-embedding"
        )
        return state

    def _new_groups(self, all_groups, backend, only_members=False, token=None):
        """Create one process group per rank list (every rank calls new_group for each, as
        torch.distributed requires) and return this rank's group and its member list. `token`
        names the groups for --nccl-communicator-config-path."""
        mine, mine_ranks = None, []
        options = self.pg_options(token, backend)
        for ranks in all_groups:
            group = None
            if dist.is_initialized() and len(ranks) > 1:
                group = dist.new_group(ranks, backend=backend, timeout=self.timeout, pg_options=options)
                self._owned.append(group)
            if self.rank in ranks:
                mine, mine_ranks = group, list(ranks)
        if not mine_ranks and not only_members:
            raise AssertionError(f"rank {self.rank} is in no group of {all_groups}")
        return mine, mine_ranks

    def pg_options(self, token: str | None, backend: str | None = None):
        """The NCCL options configured for the `token` groups, or None (not configured, or
        not an NCCL group: the options are NCCL's own)."""
        if token not in self.nccl_comm_cfgs or not dist.is_initialized():
            return None
        if (backend or dist.get_backend()) != "nccl":
            return None
        return nccl_options(self.nccl_comm_cfgs[token])

    def create_cpu_groups(self, token: str):
        """Gloo twins of the `token` groups (None for a size-1 group); returns this rank's.
        For small host-side agreements (the dynamic pipeline's lock-step, see
        pipeline_parallel/dynamic_executor.py): on an NCCL group the result of even a tiny
        collective reaches the host only after the compute queued before it. Collective: all
        ranks of the world call it; a second call returns the existing group."""
        if token not in self.cpu_groups:
            self.cpu_groups[token], _ = self._new_groups(self.grid.groups(token), "gloo")
        return self.cpu_groups[token]

    def destroy(self) -> None:
        """Free this layout's groups (the default group stays)."""
        for group in self._owned:
            dist.destroy_process_group(group)
        self._owned.clear()
        self.groups.clear()
        self.cpu_groups.clear()

    # ---- coordinates --------------------------------------------------------------------
    def _coord(self, axis: str) -> int:
        return self.grid.coords_of(self.rank)[axis]

    @property
    def world_size(self) -> int:
        return self.grid.world_size

    @property
    def tp_size(self) -> int:
        return self.grid.tp

    @property
    def pp_size(self) -> int:
        return self.grid.pp

    @property
    def cp_size(self) -> int:
        return self.grid.cp

    @property
    def dp_size(self) -> int:
        return self.grid.dp

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def cp_rank(self) -> int:
        return self._coord("cp")

    @property
    def dp_rank(self) -> int:
        return self._coord("dp")

    @property
    def tp_group(self):
        return self.groups.get("tp")

    @property
    def pp_group(self):
        return self.groups.get("pp")

    @property
    def cp_group(self):
        return self.groups.get("cp")

    def cp_comm(self, token: str = "cp") -> CPComm:
        """The CP group `token` ("cp", or "cp-inner"/"cp-outer" with hierarchical CP) as the
        context_parallel package uses it."""
        ranks = tuple(self.ranks[token])
        return CPComm(self.groups.get(token), ranks, ranks.index(self.rank))

    @property
    def dp_group(self):
        return self.groups.get("dp")

    @property
    def dp_cp_group(self):
        return self.groups.get("dp-cp")

    @property
    def world_group(self):
        """Every rank of the job (None in a one-process run)."""
        return self.groups.get("world")

    @property
    def mp_group(self):
        """Model-parallel group (tp x pp): grad-norm and found-inf reductions (spec §5.2)."""
        return self.groups.get("tp-pp")

    @property
    def is_pipeline_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_pipeline_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def in_embedding_group(self) -> bool:
        return self.rank in self.embedding_ranks

    def describe(self) -> str:
        return (
            f"rank {self.rank}: tp {self.tp_rank}/{self.tp_size} cp {self.cp_rank}/{self.cp_size} "
            f"dp {self.dp_rank}/{self.dp_size} pp {self.pp_rank}/{self.pp_size}"
        )

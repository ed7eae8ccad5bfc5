"""Pure rank arithmetic: which global ranks form each process group (spec §5.1).

Nothing here touches torch.distributed, so layouts can be unit-tested for any world size.
The order string lists axes from fastest-varying (adjacent global ranks) to slowest; the
default `tp-cp-dp-pp` gives `rank = tp + TP*(cp + CP*(dp + DP*pp))`.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

DEFAULT_ORDER = "tp-cp-dp-pp"
AXES = ("tp", "cp", "dp", "pp")


@dataclass(frozen=True)
class RankGrid:
    """Sizes of every parallel axis plus the order they vary in."""

    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    order: str = DEFAULT_ORDER

    def __post_init__(self):
        axes = self.order.split("-")
        if sorted(axes) != sorted(AXES):
            raise ValueError(f"rank order {self.order!r} must name each of {AXES} exactly once")
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"parallel size {axis}={getattr(self, axis)} must be >= 1")

    @property
    def axes(self) -> list[str]:
        return self.order.split("-")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def size(self, axis: str) -> int:
        return getattr(self, axis)

    def rank_of(self, coords: dict[str, int]) -> int:
        """Global rank of the given per-axis coordinates (mixed radix, fastest axis first)."""
        rank, stride = 0, 1
        for axis in self.axes:
            rank += coords[axis] * stride
            stride *= self.size(axis)
        return rank

    def coords_of(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        coords = {}
        for axis in self.axes:
            rank, coords[axis] = divmod(rank, self.size(axis))
        return coords

    def groups(self, token: str) -> list[list[int]]:
        """All groups for `token` (e.g. "tp", "dp-cp", "tp-pp").

        A group is the set of ranks that agree on every axis not in the token. Groups are
        listed in mixed-radix order of the other axes; inside a group ranks ascend, varying the
        selected axes in the order string's order (Megatron's RankGenerator does the same).
        """
        selected = set(token.split("-"))
        unknown = selected - set(AXES)
        if unknown:
            raise ValueError(f"unknown parallel axis {sorted(unknown)} in group token {token!r}")
        inner = [a for a in self.axes if a in selected]
        outer = [a for a in self.axes if a not in selected]
        groups = []
        # itertools.product varies its last argument fastest; reverse so our first axis is fastest.
        for outer_vals in product(*(range(self.size(a)) for a in reversed(outer))):
            fixed = dict(zip(reversed(outer), outer_vals))
            group = []
            for inner_vals in product(*(range(self.size(a)) for a in reversed(inner))):
                group.append(self.rank_of({**fixed, **dict(zip(reversed(inner), inner_vals))}))
            groups.append(sorted(group))
        return groups


def hierarchical_cp_groups(cp_groups: list[list[int]], inner: int) -> tuple[list, list]:
    """Sub-groups of every CP group for `a2a+p2p` (spec §5.2, §9.2): `inner` consecutive CP
    ranks form an all-to-all group; ranks `inner` apart form a ring group."""
    inners, outers = [], []
    for ranks in cp_groups:
        if len(ranks) % inner:
            raise ValueError(f"hierarchical CP inner size {inner} does not divide CP size {len(ranks)}")
        inners += [ranks[k:k + inner] for k in range(0, len(ranks), inner)]
        outers += [ranks[i::inner] for i in range(inner)]
    return inners, outers


def embedding_groups(pipeline_groups: list[list[int]], tied: bool = True) -> list[list[int]]:
    """Ranks that hold a copy of the word embedding (spec §5.3): first stage, plus last if tied."""
    out = []
    for ranks in pipeline_groups:
        members = {ranks[0], ranks[-1]} if tied else {ranks[0]}
        out.append(sorted(members))
    return out


def position_embedding_groups(pipeline_groups: list[list[int]]) -> list[list[int]]:
    return [[ranks[0]] for ranks in pipeline_groups]

"""Which global transformer layers each (pipeline rank, virtual chunk) holds.

Pure arithmetic, no torch. Virtual stages are numbered in pipeline order `v = chunk * PP +
pp_rank` (spec §5.4: chunk c of rank r follows chunk c of rank r-1, and chunk c of the last
rank feeds chunk c+1 of rank 0). Each virtual stage gets a number of layers and the layers are
dealt out consecutively in that order, which reproduces Megatron's offsets
(`get_transformer_layer_offset` / `get_num_layers_to_build`) for the even split, the
`--account-for-{embedding,loss}-in-pipeline-split` split and the uneven
`--decoder-{first,last}-pipeline-num-layers` split. Layer numbers are global and 1-based, so
parameter names (and checkpoints) do not depend on the layout.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineLayout:
    pp_size: int
    vpp_size: int  # model chunks per pipeline rank (1 = no interleaving)
    # stage_layers[v]: global 1-based layer numbers of virtual stage v = chunk * PP + pp_rank
    stage_layers: tuple[tuple[int, ...], ...]

    @property
    def num_stages(self) -> int:
        return self.pp_size * self.vpp_size

    def stage(self, pp_rank: int, chunk: int) -> int:
        return chunk * self.pp_size + pp_rank

    def layers(self, pp_rank: int, chunk: int) -> list[int]:
        return list(self.stage_layers[self.stage(pp_rank, chunk)])

    def is_first(self, pp_rank: int, chunk: int) -> bool:
        """Owns the embedding (spec §5.4: first pp rank AND chunk 0)."""
        return self.stage(pp_rank, chunk) == 0

    def is_last(self, pp_rank: int, chunk: int) -> bool:
        """Owns the final norm, output layer and loss (last pp rank AND last chunk)."""
        return self.stage(pp_rank, chunk) == self.num_stages - 1

    def rank_layers(self, pp_rank: int) -> list[list[int]]:
        return [self.layers(pp_rank, c) for c in range(self.vpp_size)]


def _stage_sizes(num_layers: int, pp: int, vpp: int, first: int | None, last: int | None,
                 account_for_embedding: bool, account_for_loss: bool) -> list[int]:
    """Layers per virtual stage, in pipeline order."""
    if first is not None or last is not None:
        if account_for_embedding or account_for_loss:
            raise ValueError("--decoder-first/last-pipeline-num-layers cannot be combined with --account-for-"
                             "embedding-in-pipeline-split / --account-for-loss-in-pipeline-split")
        per_rank = {0: first, pp - 1: last}
        middle_ranks = [r for r in range(pp) if per_rank.get(r) is None]
        middle_layers = num_layers - sum(v for v in (first, last) if v is not None)
        if middle_layers < 0 or (middle_ranks and middle_layers % len(middle_ranks)) \
                or (not middle_ranks and middle_layers):
            raise ValueError(f"--num-layers ({num_layers}) does not split over "
                             f"--pipeline-model-parallel-size ({pp}) with "
                             f"--decoder-first/last-pipeline-num-layers ({first}, {last})")
        rank_sizes = [per_rank.get(r) if per_rank.get(r) is not None
                      else middle_layers // len(middle_ranks) for r in range(pp)]
        for r, n in enumerate(rank_sizes):
            if n % vpp:
                raise ValueError(f"{n} layers on pipeline rank {r} do not divide into {vpp} virtual stages")
        return [rank_sizes[r] // vpp for _ in range(vpp) for r in range(pp)]
    # The embedding / loss may count as one layer each; the stage that owns it builds one
    # transformer layer less (Megatron's account_for_*_in_pipeline_split).
    total = num_layers + int(account_for_embedding) + int(account_for_loss)
    if total % (pp * vpp):
        raise ValueError(f"{total} layers (--num-layers {num_layers}, plus embedding/loss if accounted for) "
                         f"do not divide into --pipeline-model-parallel-size ({pp}) x {vpp} virtual stages")
    sizes = [total // (pp * vpp)] * (pp * vpp)
    sizes[0] -= int(account_for_embedding)
    sizes[-1] -= int(account_for_loss)
    return sizes


def build_layout(num_layers: int, pp_size: int = 1, vpp_size: int | None = None, *,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                 account_for_embedding: bool = False, account_for_loss: bool = False) -> PipelineLayout:
    """Layers of every (pipeline rank, chunk). `vpp_size` None or 1 means no interleaving.
    Raises ValueError for a split that does not work out (config/validation.py names the flags
    at parse time; this is the library-level check)."""
    vpp = vpp_size or 1
    if pp_size < 1 or vpp < 1 or num_layers < 1:
        raise ValueError(f"bad pipeline layout: {num_layers} layers, PP {pp_size}, VPP {vpp}")
    if vpp > 1 and pp_size == 1:
        raise ValueError("virtual pipeline stages need --pipeline-model-parallel-size > 1")
    sizes = _stage_sizes(num_layers, pp_size, vpp, first_stage_layers, last_stage_layers,
                         account_for_embedding, account_for_loss)
    stages, next_layer = [], 1
    for v, n in enumerate(sizes):
        if n < 0 or (n == 0 and 0 < v < len(sizes) - 1):
            # A middle stage without layers would only forward its input: almost surely a typo.
            raise ValueError(f"virtual pipeline stage {v} would hold {n} transformer layers (--num-layers, "
                             "--pipeline-model-parallel-size, --decoder-first/last-pipeline-num-layers)")
        stages.append(tuple(range(next_layer, next_layer + n)))
        next_layer += n
    assert next_layer == num_layers + 1, (sizes, num_layers)
    return PipelineLayout(pp_size, vpp, tuple(stages))


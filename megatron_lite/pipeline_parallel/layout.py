"""Which global transformer layers each (pipeline rank, virtual chunk) holds.

Pure arithmetic, no torch. Virtual stages are numbered in pipeline order `v = chunk * PP +
pp_rank` (spec §5.4: chunk c of rank r follows chunk c of rank r-1, and chunk c of the last
rank feeds chunk c+1 of rank 0). Each virtual stage gets a number of layers and the layers are
dealt out consecutively in that order, which reproduces Megatron's offsets
(`get_transformer_layer_offset` / `get_num_layers_to_build`) for the even split, the
`--account-for-{embedding,loss}-in-pipeline-split` split and the uneven
`--decoder-{first,last}-pipeline-num-layers` split, or takes the stages' sizes from Megatron's
`--pipeline-model-parallel-layout` string. Layer numbers are global and 1-based, so parameter
names (and checkpoints) do not depend on the layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineLayout:
    pp_size: int
    vpp_size: int  # model chunks per pipeline rank (1 = no interleaving)
    # stage_layers[v]: global 1-based layer numbers of virtual stage v = chunk * PP + pp_rank
    stage_layers: tuple[tuple[int, ...], ...]

    def stage(self, pp_rank: int, chunk: int) -> int:
        return virtual_stage(self.pp_size, pp_rank, chunk)

    def layers(self, pp_rank: int, chunk: int) -> list[int]:
        return list(self.stage_layers[self.stage(pp_rank, chunk)])

    def is_first(self, pp_rank: int, chunk: int) -> bool:
        """Owns the embedding (spec §5.4: first pp rank AND chunk 0)."""
        return self.stage(pp_rank, chunk) == 0

    def is_last(self, pp_rank: int, chunk: int) -> bool:
        """Owns the final norm, output layer and loss (last pp rank AND last chunk)."""
        return self.stage(pp_rank, chunk) == last_virtual_stage(self.pp_size, self.vpp_size)

    def rank_layers(self, pp_rank: int) -> list[list[int]]:
        return [self.layers(pp_rank, c) for c in range(self.vpp_size)]


def virtual_stage(pp_size: int, pp_rank: int, chunk: int) -> int:
    """spec §5.4: virtual stage of (pipeline rank, chunk), in pipeline order."""
    return chunk * pp_size + pp_rank


def last_virtual_stage(pp_size: int, vpp_size: int) -> int:
    return pp_size * vpp_size - 1


def check_virtual_pipeline(pp_size: int, vpp_size: int | None) -> None:
    """Chunks only interleave between several pipeline ranks (schedules.py asks the same)."""
    if (vpp_size or 1) > 1 and pp_size == 1:
        raise ValueError("virtual pipeline stages need --pipeline-model-parallel-size > 1")


def _counted_layers(num_layers: int, pp: int, account_for_embedding: bool, account_for_loss: bool) -> int:
    """Layers split over the pipeline ranks: the embedding / loss may count as one layer each
    (Megatron's account_for_*_in_pipeline_split); the total must divide over the ranks."""
    total = num_layers + int(account_for_embedding) + int(account_for_loss)
    if total % pp:
        counted = ("--num-layers" if total == num_layers
                   else "--num-layers plus --account-for-*-in-pipeline-split")
        raise ValueError(f"{counted} ({total}) must be divisible by --pipeline-model-parallel-size ({pp})")
    return total


def virtual_stages_per_rank(num_layers: int, pp_size: int, layers_per_virtual_stage: int, *,
                            account_for_embedding: bool = False, account_for_loss: bool = False) -> int:
    """VPP from `--num-layers-per-virtual-pipeline-stage` (spec §5.4): layers per pipeline
    rank / layers per virtual stage."""
    per_rank = _counted_layers(num_layers, pp_size, account_for_embedding, account_for_loss) // pp_size
    if per_rank % layers_per_virtual_stage:
        raise ValueError(f"--num-layers-per-virtual-pipeline-stage ({layers_per_virtual_stage}) must "
                         f"divide the layers per pipeline stage ({per_rank})")
    return per_rank // layers_per_virtual_stage


def _uneven_rank_sizes(num_layers: int, pp: int, vpp: int, first: int | None, last: int | None,
                       accounted: bool) -> list[int]:
    """Layers per pipeline rank with `--decoder-{first,last}-pipeline-num-layers`; the ranks in
    between share the rest evenly."""
    if pp < 2:
        raise ValueError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    if accounted:
        raise ValueError("--decoder-first/last-pipeline-num-layers cannot be combined with "
                         "--account-for-embedding-in-pipeline-split / --account-for-loss-in-pipeline-split")
    layers_left, stages_left = num_layers, pp
    for flag, value in (("--decoder-first-pipeline-num-layers", first),
                        ("--decoder-last-pipeline-num-layers", last)):
        if value is None:
            continue
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
        if vpp > 1 and value % vpp:
            raise ValueError(f"{flag} ({value}) must be divisible by "
                             f"--num-virtual-stages-per-pipeline-rank ({vpp})")
        layers_left -= value
        stages_left -= 1
    prefix = (f"--num-layers ({num_layers}) minus --decoder-first/last-pipeline-num-layers leaves "
              f"{layers_left}")
    if layers_left < 0:
        raise ValueError(f"{prefix} layers")
    middle = 0
    if stages_left == 0 and layers_left:
        raise ValueError(f"{prefix} layers but no middle stage (--pipeline-model-parallel-size {pp})")
    if stages_left:
        if layers_left % stages_left:
            raise ValueError(f"{prefix} layers, not divisible over the {stages_left} middle pipeline stages")
        middle = layers_left // stages_left
        if vpp > 1 and middle % vpp:
            raise ValueError(f"layers per middle pipeline stage ({middle}) must be divisible by "
                             f"--num-virtual-stages-per-pipeline-rank ({vpp})")
    per_rank = {0: first, pp - 1: last}
    return [middle if per_rank.get(r) is None else per_rank[r] for r in range(pp)]


def _stage_sizes(num_layers: int, pp: int, vpp: int, first: int | None, last: int | None,
                 account_for_embedding: bool, account_for_loss: bool) -> list[int]:
    """Layers per virtual stage, in pipeline order. The messages name the flags: validation
    (config/validation.py) shows them as they are."""
    if first is not None or last is not None:
        accounted = account_for_embedding or account_for_loss
        rank_sizes = _uneven_rank_sizes(num_layers, pp, vpp, first, last, accounted)
        return [rank_sizes[r] // vpp for _ in range(vpp) for r in range(pp)]
    total = _counted_layers(num_layers, pp, account_for_embedding, account_for_loss)
    if (total // pp) % vpp:
        raise ValueError(f"layers per pipeline stage ({total // pp}) must be divisible by "
                         f"--num-virtual-stages-per-pipeline-rank ({vpp})")
    # The stage that owns the embedding / loss builds one transformer layer less.
    sizes = [total // (pp * vpp)] * (pp * vpp)
    sizes[0] -= int(account_for_embedding)
    sizes[-1] -= int(account_for_loss)
    return sizes


_LAYOUT_FLAG = "--pipeline-model-parallel-layout"


def parse_layout(text: str, num_layers: int, pp_size: int) -> list[int]:
    """Transformer layers per virtual stage (pipeline order) from Megatron's layout string:
    stages separated by `|`, in each `E` (embedding), `t` (a transformer layer) and `L` (output
    layer and loss); `x*n` and `(...)*n` repeat, commas are cosmetic. E.g. `Et*4|t*3|t*3|t*3|
    t*3|t*3|t*3|t*2L` is PP 2 x VPP 4 with 13 layers on rank 0 and 11 plus the loss on rank 1.
    The embedding must open the first stage and the loss close the last (where this
    framework builds them); `m` (multi-token prediction) is refused. The number of stages over
    PP is the VPP size (spec §5.4)."""
    unrolled = text.replace(",", "")
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):  # (...)*n first, then x*n
        unrolled = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), unrolled)
    stages = unrolled.split("|")
    bad = sorted(set(unrolled) - set("EtL|"))
    if "m" in bad:
        raise ValueError(f"{_LAYOUT_FLAG} {text}: multi-token prediction layers (m) are not supported")
    if bad:
        raise ValueError(f"{_LAYOUT_FLAG} {text}: unknown layer {bad[0]!r} (E embedding, t transformer "
                         "layer, L loss; | separates stages)")
    flat = "".join(stages)
    if not stages[0].startswith("E") or flat.count("E") != 1:
        raise ValueError(f"{_LAYOUT_FLAG} {text}: the embedding (E) must open the first stage, once")
    if not stages[-1].endswith("L") or flat.count("L") != 1:
        raise ValueError(f"{_LAYOUT_FLAG} {text}: the loss (L) must close the last stage, once")
    if flat.count("t") != num_layers:
        raise ValueError(f"{_LAYOUT_FLAG} {text}: {flat.count('t')} transformer layers (t), "
                         f"--num-layers is {num_layers}")
    if len(stages) % pp_size:
        raise ValueError(f"{_LAYOUT_FLAG} {text}: {len(stages)} stages do not divide over "
                         f"--pipeline-model-parallel-size {pp_size}")
    return [stage.count("t") for stage in stages]


def build_layout(num_layers: int, pp_size: int = 1, vpp_size: int | None = None, *,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                 account_for_embedding: bool = False, account_for_loss: bool = False,
                 layout: str | None = None) -> PipelineLayout:
    """Layers of every (pipeline rank, chunk). `vpp_size` None or 1 means no interleaving;
    `layout` (Megatron's string, `parse_layout`) sets the stages and so the VPP size itself.
    Raises ValueError, naming the flags, for a split that does not work out: this module owns
    those rules, and config/validation.py reports its messages at parse time."""
    vpp = vpp_size or 1
    if layout is not None:
        sizes = parse_layout(layout, num_layers, pp_size)
        vpp = len(sizes) // pp_size
    if pp_size < 1 or vpp < 1 or num_layers < 1:
        raise ValueError(f"bad pipeline layout: {num_layers} layers, PP {pp_size}, VPP {vpp}")
    # The split is checked first: config/validation.py has always reported it before this.
    if layout is None:
        sizes = _stage_sizes(num_layers, pp_size, vpp, first_stage_layers, last_stage_layers,
                             account_for_embedding, account_for_loss)
    check_virtual_pipeline(pp_size, vpp)
    stages, next_layer = [], 1
    for v, n in enumerate(sizes):
        if n < 0 or (n == 0 and 0 < v < len(sizes) - 1):
            # A middle stage without layers would only forward its input: almost surely a typo.
            flags = (_LAYOUT_FLAG if layout is not None else "--num-layers, --pipeline-model-parallel-size, "
                     "--decoder-first/last-pipeline-num-layers")
            raise ValueError(f"virtual pipeline stage {v} would hold {n} transformer layers ({flags})")
        stages.append(tuple(range(next_layer, next_layer + n)))
        next_layer += n
    assert next_layer == num_layers + 1, (sizes, num_layers)
    return PipelineLayout(pp_size, vpp, tuple(stages))


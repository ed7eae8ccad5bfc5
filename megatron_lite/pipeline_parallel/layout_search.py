"""Which `--pipeline-model-parallel-layout` makes a pipeline step shortest, by simulation.

The even split leaves the last virtual stage the output layer and the loss on top of its
transformer layers, and the first one the embedding; moving whole layers off them helps, but
by how much, and which layers to move, depends on the schedule: a small last stage shortens
the path from a micro-batch's first forward to its first backward, which the warm-up and the
cool-down of every interleaved step wait on. `search_layouts` walks from the even split (and
any given start) to the layout whose simulated step (simulate.py, the static schedule of spec
§6.2) is shortest, moving one layer at a time between any two virtual stages.

The costs come from a measured `--pipeline-trace-file` (`fit_costs`: per-layer forward and
backward times, and what the embedding and the output layer add) or are given directly;
tools/pipeline_layout_search.py is the command line. Pure arithmetic, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.pipeline_parallel.dynamic import Task
from megatron_lite.pipeline_parallel.schedules import Op
from megatron_lite.pipeline_parallel.simulate import SimResult, simulate


@dataclass(frozen=True)
class StageCosts:
    """Milliseconds per micro-batch, each a (forward, backward) pair: one transformer layer,
    and what the first virtual stage (embedding) and the last (final norm, output layer, loss)
    add to their layers."""

    layer: tuple[float, float]
    embedding: tuple[float, float] = (0.0, 0.0)
    head: tuple[float, float] = (0.0, 0.0)

    def of_stage(self, v: int, layers: int, stages: int) -> tuple[float, float]:
        """(forward, backward) ms of virtual stage `v` holding `layers` transformer layers."""
        f, b = layers * self.layer[0], layers * self.layer[1]
        if v == 0:
            f, b = f + self.embedding[0], b + self.embedding[1]
        if v == stages - 1:
            f, b = f + self.head[0], b + self.head[1]
        return f, b


def simulate_layout(sizes: list[int], pp: int, m: int, costs: StageCosts,
                    group_size: int | None = None, latency: float = 0.0) -> SimResult:
    """One step of the static interleaved schedule with `sizes[v]` layers in virtual stage v
    (pipeline order, v = chunk * PP + pp_rank, spec §5.4)."""
    stages = len(sizes)
    per_stage = [costs.of_stage(v, n, stages) for v, n in enumerate(sizes)]

    def duration(pp_rank: int, task: Task) -> float:
        f, b = per_stage[task.chunk * pp + pp_rank]
        return f if task.op is Op.FORWARD else b

    return simulate(pp, stages // pp, m, duration, dynamic=False, group_size=group_size,
                    latency=latency)


def even_sizes(num_layers: int, stages: int) -> list[int]:
    """The even split (what `build_layout` gives without flags), extra layers on the earliest
    stages when it does not divide (a start point for the search only); with fewer layers than
    stages, one per middle stage and the rest on the first."""
    if num_layers < stages:
        return [num_layers - (stages - 2)] + [1] * (stages - 2) + [0]
    base, extra = divmod(num_layers, stages)
    return [base + (v < extra) for v in range(stages)]


def layout_string(sizes: list[int]) -> str:
    """Megatron's `--pipeline-model-parallel-layout` for these stage sizes, e.g. `Et*4|t*3|tL`
    (layout.parse_layout reads it back)."""
    def stage(v: int, n: int) -> str:
        body = "" if n == 0 else ("t" if n == 1 else f"t*{n}")
        return ("E" if v == 0 else "") + body + ("L" if v == len(sizes) - 1 else "")
    return "|".join(stage(v, n) for v, n in enumerate(sizes))


def _neighbours(sizes: list[int]):
    """Every layout one layer away: a layer moved from stage i to stage j. Middle stages keep
    at least one layer (build_layout refuses empty ones); the first and last may empty."""
    last = len(sizes) - 1
    for i, n in enumerate(sizes):
        if n == 0 or (n == 1 and 0 < i < last):
            continue
        for j in range(len(sizes)):
            if j != i:
                moved = list(sizes)
                moved[i] -= 1
                moved[j] += 1
                yield moved


def search_layouts(num_layers: int, pp: int, vpp: int, m: int, costs: StageCosts, *,
                   group_size: int | None = None, latency: float = 0.0, starts: tuple = (),
                   top: int = 5, budget: int = 20000) -> list[tuple[float, list[int]]]:
    """The `top` shortest (simulated step ms, stage sizes) seen by walks from the even split and
    from each of `starts`: each step moves to the best layout one layer away; where none is
    better, to the first better one two layers away (a pair of stages may need to change
    together). At most `budget` layouts are simulated. Ties go to the layout with fewer layers
    on its busiest rank (activation memory), then to the lexicographically smaller sizes."""
    if num_layers < pp * vpp - 2:
        raise ValueError(f"{num_layers} layers cannot give each of the {pp * vpp - 2} middle virtual "
                         "stages one")
    seen: dict[tuple, float] = {}

    def span(sizes: list[int]) -> float:
        key = tuple(sizes)
        if key not in seen:
            seen[key] = simulate_layout(sizes, pp, m, costs, group_size, latency).span
        return seen[key]

    for start in (even_sizes(num_layers, pp * vpp), *starts):
        current = list(start)
        span(current)  # ranked too, even where nothing moves
        while len(seen) < budget:
            best = min(_neighbours(current), key=lambda s: (span(s), s), default=None)
            if best is None or span(best) >= span(current) - 1e-9:
                best = next((s for first in _neighbours(current) for s in _neighbours(first)
                             if len(seen) < budget and span(s) < span(current) - 1e-9), None)
            if best is None:
                break
            current = best

    def busiest(sizes) -> int:
        return max(sum(sizes[r::pp]) for r in range(pp))

    ranked = sorted(seen.items(), key=lambda kv: (round(kv[1], 6), busiest(kv[0]), kv[0]))
    return [(t, list(sizes)) for sizes, t in ranked[:top]]


def fit_costs(chunk_ms: dict, sizes: list[int], pp: int) -> StageCosts:
    """Per-layer, embedding and head costs from measured mean ms per (pp_rank, chunk, "F"|"B")
    of a run with stage sizes `sizes`: a layer's cost by least squares over the middle stages
    (no embedding, no head), then what the first and the last stage take beyond their layers
    (at least 0: noise must not make a stage cheaper than its layers)."""
    stages = len(sizes)
    middle = [v for v in range(1, stages - 1) if sizes[v] > 0]
    if not middle:
        raise ValueError("fitting per-layer costs needs a middle virtual stage with layers "
                         "(PP x VPP >= 3); give the costs instead")

    def ms(v: int, op: str) -> float:
        key = (v % pp, v // pp, op)
        if key not in chunk_ms:
            raise ValueError(f"no {op} of pipeline rank {key[0]}, chunk {key[1]} measured "
                             f"({stages} virtual stages expected)")
        return chunk_ms[key]

    fitted = {}
    for op in "FB":
        layer = (sum(sizes[v] * ms(v, op) for v in middle) / sum(sizes[v] ** 2 for v in middle))
        fitted[op] = (layer, max(0.0, ms(0, op) - sizes[0] * layer),
                      max(0.0, ms(stages - 1, op) - sizes[-1] * layer))
    return StageCosts(layer=(fitted["F"][0], fitted["B"][0]),
                      embedding=(fitted["F"][1], fitted["B"][1]),
                      head=(fitted["F"][2], fitted["B"][2]))

"""Layout search (pipeline_parallel/layout_search.py, tools/pipeline_layout_search.py): the
layout strings read back as the same stages, the walk finds what exhaustive enumeration finds,
the costs fitted from a trace are the costs that made it, and the command prints the layout."""
import itertools

import pytest

from megatron_lite.pipeline_parallel.layout import parse_layout
from megatron_lite.pipeline_parallel.layout_search import (
    StageCosts,
    even_sizes,
    fit_costs,
    layout_string,
    search_layouts,
    simulate_layout,
)
from megatron_lite.pipeline_parallel.trace import TraceEvent, write_chrome_trace
from tools import pipeline_layout_search as tool

# A GPT-like shape: backward twice the forward, the output layer and loss about 3 layers.
COSTS = StageCosts(layer=(1.0, 2.0), embedding=(0.2, 0.1), head=(3.0, 6.0))


@pytest.mark.parametrize("sizes", [[4, 3, 3, 3, 3, 3, 3, 2], [0, 5, 5, 0], [1, 1], [2, 6, 7, 1, 1, 3]])
def test_layout_string_reads_back(sizes):
    text = layout_string(sizes)
    assert parse_layout(text, sum(sizes), 2) == sizes
    assert layout_string([4, 3, 1]) == "Et*4|t*3|tL"


def _exhaustive(num_layers, pp, vpp, m, costs):
    stages = pp * vpp
    spans = []
    for sizes in itertools.product(range(num_layers + 1), repeat=stages - 1):
        last = num_layers - sum(sizes)
        full = [*sizes, last]
        if last >= 0 and all(n >= 1 for n in full[1:-1]):
            spans.append(simulate_layout(full, pp, m, costs).span)
    return min(spans)


@pytest.mark.parametrize("pp,vpp,m,layers", [(2, 2, 4, 8), (2, 2, 8, 10), (2, 3, 4, 9), (3, 2, 6, 9)])
def test_search_finds_the_exhaustive_optimum(pp, vpp, m, layers):
    found = search_layouts(layers, pp, vpp, m, COSTS, top=3)
    assert found[0][0] == pytest.approx(_exhaustive(layers, pp, vpp, m, COSTS))
    assert [t for t, _ in found] == sorted(t for t, _ in found)
    for span, sizes in found:
        assert sum(sizes) == layers and len(sizes) == pp * vpp
        assert simulate_layout(sizes, pp, m, COSTS).span == pytest.approx(span)


def test_search_needs_a_layer_per_middle_stage():
    assert search_layouts(6, 2, 4, 8, COSTS, top=1)[0][1][1:-1] == [1] * 6
    with pytest.raises(ValueError, match="5 layers cannot give each of the 6 middle virtual stages one"):
        search_layouts(5, 2, 4, 8, COSTS)


def test_search_beats_the_even_split_by_unloading_the_last_stage():
    # PP 2 x VPP 4, M 8, 24 layers: the even split and the hand-balanced layout of README's
    # 2-GPU table are both slower than what the search finds (a small last stage).
    even = simulate_layout(even_sizes(24, 8), 2, 8, COSTS).span
    balanced = simulate_layout([4, 3, 3, 3, 3, 3, 3, 2], 2, 8, COSTS).span
    best_span, best = search_layouts(24, 2, 8 // 2, 8, COSTS, starts=([4, 3, 3, 3, 3, 3, 3, 2],))[0]
    assert best_span < balanced < even
    assert best[-1] < 3


def _trace(sizes, pp, m, costs, steps=3):
    """Events of `steps` identical steps, each the simulated static schedule with these costs."""
    events = []
    for step in range(steps):
        sim = simulate_layout(sizes, pp, m, costs)
        offset = step * (sim.span + 5.0)
        for r, line in enumerate(sim.timelines):
            events += [TraceEvent(r, r, step, ran.task.op.value, ran.task.microbatch, ran.task.chunk,
                                  (ran.start + offset) * 1e3, (ran.end + offset) * 1e3) for ran in line]
    return events, sim.span


def test_fit_recovers_the_costs_that_made_the_trace():
    sizes = [4, 3, 3, 3, 3, 3, 3, 2]
    events, _ = _trace(sizes, 2, 8, COSTS)
    chunk_ms = {}
    for e in events:
        chunk_ms[(e.pp_rank, e.chunk, e.op)] = (e.end_us - e.start_us) / 1e3
    fitted = fit_costs(chunk_ms, sizes, 2)
    for part in ("layer", "embedding", "head"):
        assert getattr(fitted, part) == pytest.approx(getattr(COSTS, part))
    with pytest.raises(ValueError, match="middle virtual stage"):
        fit_costs(chunk_ms, [12, 12], 2)
    del chunk_ms[(1, 2, "B")]
    with pytest.raises(ValueError, match="no B of pipeline rank 1, chunk 2"):
        fit_costs(chunk_ms, sizes, 2)


def test_tool_from_a_trace_prints_the_fit_the_ratio_and_the_best_layout(tmp_path, capsys):
    sizes = [3, 2, 2, 2, 2, 1]  # PP 2 x VPP 3, 12 layers
    events, span = _trace(sizes, 2, 4, COSTS)
    path = tmp_path / "trace.json"
    write_chrome_trace(events, str(path))
    layout = layout_string(sizes)
    assert tool.main([str(path), "--num-layers", "12", "--layout", layout, "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("PP 2, VPP 3, M 4; ms per micro-batch: layer F 1.000 B 2.000, embedding F 0.200 "
                      "B 0.100, head F 3.000 B 6.000")
    assert out[1].startswith(f"traced layout {layout}: simulated {span:.2f} ms")
    assert out[1].endswith(f"traced {span:.2f} ms (1.000x the simulation)")
    best_span, best = search_layouts(12, 2, 3, 4, COSTS, starts=(sizes,), top=1)[0]
    assert out[2].split() == [f"{best_span:.2f}", "ms", f"({span / best_span:.3f}x)", "bubble",
                              f"{simulate_layout(best, 2, 4, COSTS).bubble:.4f}",
                              "--pipeline-model-parallel-layout", f'"{layout_string(best)}"']
    assert len(out) == 4


def test_tool_from_given_costs_matches_the_search(capsys):
    argv = ["--num-layers", "12", "--pipeline-model-parallel-size", "2", "--num-micro-batches", "4",
            "--layout", "Et*2|t*2|t*2|t*2|t*2|t*2L", "--layer-ms", "1", "2", "--embedding-ms",
            "0.2", "0.1", "--head-ms", "3", "6", "--top", "1"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    best = search_layouts(12, 2, 3, 4, COSTS, starts=([2] * 6,), top=1)[0][1]
    assert out[1].startswith("given layout Et*2|t*2|t*2|t*2|t*2|t*2L: simulated")
    assert out[2].endswith(f'--pipeline-model-parallel-layout "{layout_string(best)}"')


def test_tool_tries_other_group_sizes(capsys):
    argv = ["--num-layers", "12", "--pipeline-model-parallel-size", "2", "--num-micro-batches", "8",
            "--layout", "Et*2|t*2|t*2|t*2|t*2|t*2L", "--layer-ms", "1", "2", "--head-ms", "3", "6",
            "--top", "1", "--try-group-sizes", "4"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    costs = StageCosts(layer=(1.0, 2.0), head=(3.0, 6.0))
    span, best = search_layouts(12, 2, 3, 8, costs, group_size=4, starts=([2] * 6,), top=1)[0]
    assert len(out) == 4 and out[3].split()[0] == f"{span:.2f}"
    assert out[3].endswith(f'"{layout_string(best)}" --microbatch-group-size-per-virtual-pipeline-stage 4')


@pytest.mark.parametrize("argv,message", [
    (["--num-layers", "24", "--layer-ms", "1", "2"],
     "error: without a trace, give --pipeline-model-parallel-size, --num-micro-batches, "
     "--num-virtual-stages-per-pipeline-rank (or --layout)"),
    (["--num-layers", "24", "--pipeline-model-parallel-size", "2", "--num-micro-batches", "8",
      "--num-virtual-stages-per-pipeline-rank", "4", "--layer-ms", "1", "2", "--layout", "Et*12|t*12L"],
     "error: --layout Et*12|t*12L: 2 stages, not PP 2 x VPP 4"),
    (["--num-layers", "24", "--pipeline-model-parallel-size", "2", "--num-micro-batches", "8",
      "--layer-ms", "1", "2", "--layout", "Et*12|t*11L"],
     "error: --pipeline-model-parallel-layout Et*12|t*11L: 23 transformer layers (t), --num-layers is 24"),
])
def test_tool_bad_input_is_one_error_line(argv, message, capsys):
    assert tool.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and captured.out == ""


def test_tool_refuses_flags_a_trace_decides(tmp_path, capsys):
    events, _ = _trace([3, 2, 2, 2, 2, 1], 2, 4, COSTS)
    path = tmp_path / "trace.json"
    write_chrome_trace(events, str(path))
    cases = ((["--head-ms", "3", "6"], f"error: --head-ms: the costs come from the trace {path}"),
             (["--num-micro-batches", "8"], f"error: --num-micro-batches 8: the trace {path} has 4"))
    for extra, message in cases:
        assert tool.main([str(path), "--num-layers", "12", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err


def test_tool_bad_trace_names_the_file(tmp_path, capsys):
    path = tmp_path / "notes.json"
    path.write_text('{"traceEvents": [{"ph": "X", "pid": 0}]}')
    assert tool.main([str(path), "--num-layers", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: not a --pipeline-trace-file trace") and "\n" not in err

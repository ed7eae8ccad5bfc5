"""Pipeline trace: Chrome-trace export, measured bubble, and the simulated bubble of the
schedules, which must equal the theoretical (PP-1)/(VPP*M) of spec §6 for equal stages."""
import pytest
import torch

from megatron_lite.pipeline_parallel.trace import (
    PipelineTrace,
    TraceEvent,
    bubble_stats,
    read_chrome_trace,
    simulated_bubble,
    write_chrome_trace,
)


@pytest.mark.parametrize("pp,vpp,m,n", [(2, 1, 4, None), (4, 1, 8, None), (2, 2, 4, None), (4, 2, 8, None),
                                        (4, 4, 8, None), (4, 4, 8, 8), (4, 2, 12, 6)])
def test_schedules_reach_the_theoretical_bubble(pp, vpp, m, n):
    # A chunk holds 1/VPP of a stage's layers; backward costs twice the forward.
    durations = {(r, op): (1.0 if op == "F" else 2.0) / vpp for r in range(pp) for op in "FB"}
    assert simulated_bubble(pp, vpp, m, durations, n) == pytest.approx((pp - 1) / (vpp * m))


def test_unbalanced_last_stage_adds_bubble():
    durations = {(r, op): 1.0 if op == "F" else 2.0 for r in range(2) for op in "FB"}
    durations[(1, "F")] = 2.0
    assert simulated_bubble(2, 1, 8, durations) > 1 / 8


def test_trace_records_steps_exports_and_measures(tmp_path):
    trace = PipelineTrace(rank=0, pp_rank=0, device=torch.device("cpu"))
    trace.start_step()
    with trace.span("F", 0, 0):
        pass
    with trace.span("B", 0, 0):
        pass
    trace.finish_step()
    assert [(e.op, e.microbatch, e.chunk, e.step) for e in trace.events] == [("F", 0, 0, 0), ("B", 0, 0, 0)]
    assert "step 1 rank 0 (pp 0)" in trace.step_line() and "F0.0" in trace.step_line()
    # Two ranks, one step: rank 0 busy 0-10 and 20-30 us, rank 1 busy 10-20 us.
    events = [TraceEvent(0, 0, 1, "F", 0, 0, 0.0, 10.0), TraceEvent(1, 1, 1, "F", 0, 0, 10.0, 20.0),
              TraceEvent(0, 0, 1, "B", 0, 0, 20.0, 30.0)]
    stats = bubble_stats(events)
    assert stats.steps == 1 and stats.mean_span_ms == pytest.approx(0.03)
    assert stats.bubble_fraction == pytest.approx(((30 - 20) / 20 + (30 - 10) / 10) / 2)
    path = tmp_path / "t.json"
    write_chrome_trace(events, str(path))
    assert read_chrome_trace(str(path)) == events

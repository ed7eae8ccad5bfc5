"""tools/bench/trace_streams.py: the busy/idle/exposed-communication arithmetic on a synthetic
Chrome trace whose answer is known."""
import json

import pytest

from tools.bench.trace_streams import idle_gaps, kernel_class, summarize, union_length


def _kernel(name, ts, dur, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_union_counts_overlaps_once():
    assert union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert union_length([]) == 0


def test_kernel_classes():
    assert kernel_class("ncclDevKernel_AllGather_RING_LL") == "nccl"
    assert kernel_class("nvjet_sm90_tst_256x128") == "gemm"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert kernel_class("triton_poi_fused_gelu_0") == "other"
    assert kernel_class("barrier_kernel") == "barrier"  # symmetric memory's cross-GPU barrier
    assert kernel_class("Memcpy DtoD (Device -> Device)", "gpu_memcpy") == "memcpy"


def test_summary_of_a_known_trace(tmp_path):
    # NCCL 0-10 us on stream 20, half hidden behind a GEMM 5-15 on stream 7, then 15 us idle,
    # then an elementwise kernel 30-35: busy 20, idle 15, exposed NCCL 5.
    events = [_kernel("ncclDevKernel_AllGather", 0, 10, 20), _kernel("nvjet_gemm", 5, 10, 7),
              _kernel("elementwise", 30, 5, 7), {"ph": "X", "cat": "cpu_op", "name": "aten::mm",
                                                  "ts": 0, "dur": 100}]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    r = summarize(str(path))
    assert (r["window_ms"], r["busy_ms"], r["idle_ms"]) == pytest.approx((0.035, 0.020, 0.015))
    assert (r["compute_ms"], r["comm_ms"], r["comm_exposed_ms"]) == pytest.approx((0.015, 0.010, 0.005))
    assert r["streams"] == {"20": 0.01, "7": 0.01}
    assert r["idle_gaps"] == [(15, "nvjet_gemm", "elementwise")]
    assert idle_gaps([]) == []
    assert (r["host_waited_ms"], r["kernel_launches"]) == (0, 0)  # no host events


def test_host_waits_and_launches(tmp_path):
    runtime = [{"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur}
               for name, ts, dur in (("cudaLaunchKernel", 0, 5), ("cudaLaunchKernel", 10, 5),
                                     ("cudaStreamSynchronize", 20, 400), ("cudaEventSynchronize", 500, 100))]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": [_kernel("nvjet_gemm", 0, 10, 7), *runtime]}))
    r = summarize(str(path))
    assert r["host_waited_ms"] == pytest.approx(0.5) and r["kernel_launches"] == 2


def test_a_trace_without_kernels_is_refused(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(SystemExit, match="holds no GPU kernels"):
        summarize(str(path))


def test_copy_engine_transfers_and_barriers_count_as_communication(tmp_path):
    # --tp-comm-overlap's copy-engine path: a barrier 0-40 us, a peer copy 40-140 partly hidden
    # behind a GEMM 40-120, so 20 us of the copy and the barrier's 40 are exposed.
    copy = {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 40, "dur": 100,
            "args": {"stream": 30}}
    events = [_kernel("barrier_kernel", 0, 40, 7), copy, _kernel("nvjet_gemm", 40, 80, 7)]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    r = summarize(str(path))
    assert (r["compute_ms"], r["comm_ms"], r["comm_exposed_ms"]) == pytest.approx((0.08, 0.14, 0.06))
    assert r["kernel_ms_by_class"] == {"barrier": 0.04, "gemm": 0.08, "memcpy": 0.1}

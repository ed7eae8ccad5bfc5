"""Checkpoint files cannot run code (DESIGN rule 13): a planted pickle in DCP's `.metadata`
or in a byte entry is refused in one line naming it, and the code in it never runs."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_lite.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save(path, state):
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_real_metadata_loads_and_tensors_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    _save(tmp_path, state)
    meta = SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert set(meta.state_dict_metadata) == {"w", "b"}
    out = {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    dcp.load(out, storage_reader=SafeFileSystemReader(str(tmp_path)), planner=SafeLoadPlanner(), no_dist=True)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])


def test_planted_metadata_pickle_is_refused_and_runs_nothing(tmp_path):
    _save(tmp_path, {"w": torch.ones(2)})
    marker = tmp_path / "pwned"
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to load posix\.system"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_byte_entries_load_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    _save(tmp_path / "ok", {"step": {"n": 3}})  # a plain dict entry: allowed by the weights-only loader
    out = {"step": {"n": 0}}
    dcp.load(out, storage_reader=SafeFileSystemReader(str(tmp_path / "ok")), planner=SafeLoadPlanner(),
             no_dist=True)
    assert out == {"step": {"n": 3}}
    _save(tmp_path / "evil", {"step": _Evil(str(marker))})
    with pytest.raises(BaseException) as info:  # DCP wraps per-rank failures in a BaseException
        dcp.load({"step": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "evil")),
                 planner=SafeLoadPlanner(), no_dist=True)
    assert "refused by the weights-only loader" in str(info.value) or any(
        "refused by the weights-only loader" in str(v) for v in getattr(info.value, "failures", {}).values())
    assert not marker.exists()


def test_convert_refuses_a_planted_metadata_in_one_line(tmp_path):
    ckpt = tmp_path / "ckpt"
    it = ckpt / "iter_0000001"
    it.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    _save(it, {"model.w": torch.ones(2)})
    (it / "common.json").write_text('{"args": {}}')
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    marker = tmp_path / "pwned"
    with open(it / ".metadata", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    cmd = [sys.executable, os.path.join(ROOT, "tools/checkpoint/convert.py"), "megatron-to-hf",
           "--load", str(ckpt), "--hf-dir", str(tmp_path / "hf")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "refusing to load posix.system" in lines[0]
    assert not marker.exists()

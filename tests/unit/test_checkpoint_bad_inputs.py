"""Bad checkpoints and failures of a run end in one line naming the culprit: an unreadable
tracker, a `common.json` without its fields, a full disk under DCP's wrapper, non-finite weights
at save time, a `--save` that is a file, a `--load` that does not exist, a NaN found by the loss
check and a collective whose peer is gone."""
import json
import os

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lite.checkpoint.io import CheckpointTargets, _check_finite, load_checkpoint
from megatron_lite.checkpoint.layout import (
    COMMON_KEYS,
    CheckpointError,
    describe_error,
    read_common,
    read_tracker,
)
from megatron_lite.config.validation import ConfigError
from megatron_lite.data_parallel.ddp import NonFiniteError
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.training.failures import report_failures
from tests.unit.test_arguments import make


def test_non_utf8_tracker_is_named(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe12")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration\.txt: cannot read the tracker"):
        read_tracker(str(tmp_path))


def test_tracker_with_garbage_is_named(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("twelve")
    with pytest.raises(CheckpointError, match="expected an iteration number or 'release', found 'twelve'"):
        read_tracker(str(tmp_path))


@pytest.mark.parametrize("missing", ["checkpoint_version", "has_optimizer", "opt_param_scheduler"])
def test_common_json_missing_a_field_is_named(tmp_path, missing):
    common = {k: 0 for k in COMMON_KEYS}
    del common[missing]
    (tmp_path / "common.json").write_text(json.dumps(common))
    expected = f"common.json: not a megatron_lite checkpoint record, missing {missing}"
    with pytest.raises(CheckpointError, match=expected):
        read_common(str(tmp_path))


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "[" * 100_000])
def test_common_json_not_an_object_is_named(tmp_path, text):
    (tmp_path / "common.json").write_text(text)
    with pytest.raises(CheckpointError, match="common.json"):
        read_common(str(tmp_path))


def test_full_disk_is_reported_under_dcps_wrapper():
    wrapped = CheckpointException("save failed", {0: (OSError(28, "No space left on device"), None)})
    assert describe_error(wrapped) == "OSError: [Errno 28] No space left on device"


def test_save_refuses_non_finite_weights():
    ps = ParallelState.create()
    model = torch.nn.Linear(3, 3)
    _check_finite([model], ps, 5)  # finite: nothing happens
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to save iteration 5: the model has non-finite"):
        _check_finite([model], ps, 5)


def test_save_that_is_a_file_is_refused_at_startup(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(ConfigError, match=f"--save {target} is a file, not a directory"):
        make(f"--save {target} --save-interval 2", 1)


class _Lines:
    def __init__(self):
        self.lines = []

    def rank0(self, line):
        self.lines.append(line)


def test_load_of_a_missing_path_warns_loudly(tmp_path):
    log = _Lines()
    missing = str(tmp_path / "nope")
    assert load_checkpoint(missing, CheckpointTargets([]), None, log) is None
    assert log.lines[0].startswith(f"WARNING: --load {missing} does not exist; training starts from random")
    assert not os.path.exists(missing)


def test_nan_check_and_lost_peers_become_one_error_line():
    def nan():
        raise NonFiniteError("Rank 0: found NaN or Inf in local forward loss calculation")

    with pytest.raises(SystemExit, match=r"^error: Rank 0: found NaN or Inf .*--no-check-for-nan-in-loss"):
        report_failures(nan)

    def stuck():
        raise RuntimeError("[gloo/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv\nmore")

    expected = (r"^error: rank \d+: a collective failed, another rank is stuck or dead "
                r"\(--distributed-timeout-minutes\): \[gloo.*Timed out waiting 60000ms for recv$")
    with pytest.raises(SystemExit, match=expected):
        report_failures(stuck)

    def bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a peer failure: the traceback stays
        report_failures(bug)


def test_bad_data_met_while_training_is_one_line():
    from megatron_lite.data.errors import DataError

    def read():
        raise DataError("/data/x_text_document: sample 3 of the train split holds token id 300")

    with pytest.raises(SystemExit, match=r"^error: /data/x_text_document: sample 3 .* token id 300$"):
        report_failures(read)

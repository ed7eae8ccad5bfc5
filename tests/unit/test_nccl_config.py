"""--nccl-communicator-config-path (distributed/nccl_config.py): Megatron's YAML of per-group
NCCL options, read as data, mapped onto megatron_lite's groups; every mistake one line naming
the file, the group and the key."""
import pytest

from megatron_lite.config.errors import ConfigError
from megatron_lite.distributed.nccl_config import load_nccl_comm_config
from megatron_lite.distributed.parallel_state import ParallelState
from tests.unit.test_arguments import make


def _write(tmp_path, text):
    path = tmp_path / "nccl.yaml"
    path.write_text(text)
    return str(path)


def test_megatron_group_names_map_onto_the_groups(tmp_path):
    path = _write(tmp_path, "dp:\n  max_ctas: 8\n  min_ctas: 2\ntp:\n  cga_cluster_size: 2\n"
                            "hcp:\n  is_high_priority_stream: true\nembd: {}\nmp:\n"
                            "dp_modulo_exp:\n  max_ctas: 4\n")
    assert load_nccl_comm_config(path) == {
        "dp": {"max_ctas": 8, "min_ctas": 2}, "tp": {"cga_cluster_size": 2},
        "cp-inner": {"is_high_priority_stream": True}, "cp-outer": {"is_high_priority_stream": True},
        "embedding": {}, "position-embedding": {}, "tp-pp": {}}


def test_an_empty_file_configures_nothing(tmp_path):
    assert load_nccl_comm_config(_write(tmp_path, "")) == {}


@pytest.mark.parametrize("text,message", [
    ("- dp\n", "expected a mapping of group names, got list"),
    ("dpp:\n  max_ctas: 8\n", "unknown group 'dpp' (one of dp, dp_cp"),
    ("dp:\n  max_cta: 8\n", "group dp: unknown option 'max_cta'"),
    ("dp:\n  max_ctas: 0\n", "group dp: max_ctas must be a whole number >= 1 (got 0)"),
    ("dp:\n  max_ctas: '8'\n", "group dp: max_ctas must be a whole number >= 1 (got '8')"),
    ("tp:\n  cga_cluster_size: true\n",
     "group tp: cga_cluster_size must be a whole number >= 1 (got True)"),
    ("dp:\n  min_ctas: 9\n  max_ctas: 8\n", "group dp: min_ctas (9) exceeds max_ctas (8)"),
    ("pp:\n  is_high_priority_stream: 1\n",
     "group pp: is_high_priority_stream must be true or false (got 1)"),
    ("dp:\n  net_name: IB\n", "group dp: net_name is not supported by megatron_lite"),
    ("dp: 8\n", "group dp: expected a mapping of options, got 8"),
    ("dp: [1\n", "not YAML ("),
    # a file is data: YAML's python tags would build objects (or run code) with yaml.load
    ("dp: !!python/object/apply:os.system ['echo owned']\n", "not YAML ("),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_nccl_comm_config(path)
    assert str(e.value).startswith(f"--nccl-communicator-config-path {path}: "), str(e.value)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_nccl_comm_config(str(tmp_path / "none.yaml"))
    missing = tmp_path / "none.yaml"
    assert str(e.value) == f"--nccl-communicator-config-path {missing}: No such file or directory"


def test_validation_reads_the_file_and_says_gloo_ignores_it(tmp_path):
    path = _write(tmp_path, "dp:\n  max_ctas: 8\n")
    notes = []
    args = make(f"--nccl-communicator-config-path {path} --distributed-backend gloo", warn=notes.append)
    assert args.nccl_comm_cfgs == {"dp": {"max_ctas": 8}}
    assert notes == ["--nccl-communicator-config-path has no effect with --distributed-backend gloo: "
                     "its options are NCCL communicators'"]
    notes.clear()
    assert (make("", warn=notes.append).nccl_comm_cfgs, notes) == ({}, [])


def test_gloo_groups_get_no_nccl_options():
    ps = ParallelState.create(nccl_comm_cfgs={"dp": {"max_ctas": 8}})
    assert ps.nccl_comm_cfgs == {"dp": {"max_ctas": 8}}
    assert ps.pg_options("dp") is None and ps.pg_options("tp") is None

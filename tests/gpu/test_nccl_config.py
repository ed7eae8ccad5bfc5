"""--nccl-communicator-config-path on NCCL: the options of Megatron's group names reach the
process groups megatron_lite builds for them, and collectives run on those groups."""
import textwrap

import pytest
import torch

from tests.functional.test_pretrain_cli import torchrun

pytestmark = pytest.mark.gpu

SCRIPT = """
import os, torch, torch.distributed as dist
from megatron_lite.distributed.nccl_config import load_nccl_comm_config
from megatron_lite.distributed.parallel_state import ParallelState
rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
ps = ParallelState.create(nccl_comm_cfgs=load_nccl_comm_config(os.environ["NCCL_CFG"]))
dp = ps.groups["dp"]._get_backend(torch.device("cuda"))
world = ps.groups["world"]._get_backend(torch.device("cuda"))
x = torch.ones(1 << 20, device="cuda")
dist.all_reduce(x, group=ps.groups["dp"])
torch.cuda.synchronize()
print(f"rank {rank} dp max_ctas {dp.options.config.max_ctas} min_ctas {dp.options.config.min_ctas} "
      f"high {dp.options.is_high_priority_stream} world max_ctas {world.options.config.max_ctas} "
      f"sum {x[0].item():.0f}", flush=True)
ps.destroy()
dist.destroy_process_group()
"""


def test_dp_options_reach_the_data_parallel_group(tmp_path, monkeypatch):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cfg = tmp_path / "nccl.yaml"
    cfg.write_text("dp:\n  max_ctas: 4\n  min_ctas: 2\n  is_high_priority_stream: true\n")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(SCRIPT))
    monkeypatch.setenv("NCCL_CFG", str(cfg))
    out = torchrun(2, str(script)).stdout
    lines = sorted(line for line in out.splitlines() if line.startswith("rank "))
    # the world group is not configured: NCCL's default maximum (not 4) stays
    assert [line.split(" world")[0] for line in lines] == [
        f"rank {r} dp max_ctas 4 min_ctas 2 high True" for r in (0, 1)], out
    assert all(line.endswith("sum 2") and "world max_ctas 4 " not in line for line in lines), out

"""--tp-comm-overlap on 2 GPUs: the collective matmuls (tensor_parallel/overlap.py, with the
copy-engine transfers of copy_engine.py inside one node) equal NCCL's collectives followed by
the GEMM in bf16, and `pretrain_gpt.py` at TP=2 with
sequence parallelism prints the same curve with and without the overlap."""
import pytest
import torch

from tests.functional.test_checkpoint_cli import _rows
from tests.functional.test_pretrain_cli import torchrun
from tests.gpu.test_cuda_checkpoint import CUDA_GPT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

# Run under torchrun on 2 GPUs: each rank compares the three ring primitives with NCCL's
# all-gather / reduce-scatter followed by the GEMM, on sequence-parallel shapes.
_PRIMITIVES = """
import os
import torch
import torch.distributed as dist
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.tensor_parallel.collectives import all_gather, reduce_scatter
from megatron_lite.tensor_parallel.overlap import all_gather_linear, all_gather_matmul, linear_reduce_scatter

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
ps = ParallelState.create(tp=dist.get_world_size())
g = torch.Generator(device="cuda").manual_seed(dist.get_rank())
x_sp = torch.randn(512, 2, 1024, generator=g, device="cuda").to(torch.bfloat16)
x_full = torch.randn(1024, 2, 768, generator=g, device="cuda").to(torch.bfloat16)
grad = torch.randn(512, 2, 1024, generator=g, device="cuda").to(torch.bfloat16)
w_col = torch.randn(1536, 1024, generator=g, device="cuda").to(torch.bfloat16) * 0.03
bias = torch.randn(1536, generator=g, device="cuda").to(torch.bfloat16)
w_row = torch.randn(1024, 768, generator=g, device="cuda").to(torch.bfloat16) * 0.03
group = ps.tp_group
from megatron_lite.tensor_parallel import copy_engine
assert copy_engine.usable(x_sp, group), "the copy-engine path should serve a TP group inside one node"
got = [all_gather_linear(x_sp, w_col, bias, group), linear_reduce_scatter(x_full, w_row, group),
       *all_gather_matmul(grad, w_row, group)]
gathered = all_gather(grad, 0, group)
want = [torch.nn.functional.linear(all_gather(x_sp, 0, group), w_col, bias),
        reduce_scatter(x_full @ w_row.t(), 0, group), gathered, gathered @ w_row]
for i, (a, b) in enumerate(zip(got, want)):
    # bf16 outputs: the ring adds the partial sums in another order than NCCL's reduce-scatter.
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"#{i}: {m}")
# Again with other shapes: the workspace grows once (the path that waits for every GPU first),
# and back-to-back operations reuse it.
for _ in range(3):
    big = torch.randn(1024, 4, 1024, generator=g, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(all_gather_linear(big, w_col, None, group).float(),
                               torch.nn.functional.linear(all_gather(big, 0, group), w_col).float(),
                               rtol=2e-2, atol=2e-2)
# Back to back in alternating regions, as a layer runs them (no barrier before the writes,
# copy_engine.py), each with fresh data: a transfer that overwrote what a peer was still
# reading would show as a mismatch. All queued before any result is checked.
results = []
for i in range(24):
    region = (copy_engine.FIRST, copy_engine.SECOND)[i % 2]
    a = torch.randn(512, 2, 1024, generator=g, device="cuda").to(torch.bfloat16)
    if i % 4 < 2:
        results.append((all_gather_matmul(a, w_col.t(), group, region=region)[1],
                        torch.nn.functional.linear(all_gather(a, 0, group), w_col)))
    else:
        b = torch.randn(1024, 2, 768, generator=g, device="cuda").to(torch.bfloat16)
        results.append((linear_reduce_scatter(b, w_row, group, region=region),
                        reduce_scatter(b @ w_row.t(), 0, group)))
for i, (a, b) in enumerate(results):
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2,
                               msg=lambda m: f"back to back #{i}: {m}")
torch.cuda.synchronize()
print("primitives ok", flush=True)
ps.destroy()
dist.destroy_process_group()
"""


def test_ring_primitives_match_nccl_collectives(tmp_path):
    script = tmp_path / "overlap_primitives.py"
    script.write_text(_PRIMITIVES)
    proc = torchrun(2, str(script))  # with PYTHONPATH at the repository
    assert proc.stdout.count("primitives ok") == 2, proc.stdout[-2000:]


def test_tp2_sequence_parallel_curve_is_unchanged_by_the_overlap():
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    plain = _rows(torchrun(2, "pretrain_gpt.py", *CUDA_GPT, *layout).stdout)
    overlap = _rows(torchrun(2, "pretrain_gpt.py", *CUDA_GPT, *layout, "--tp-comm-overlap").stdout)
    assert sorted(plain) == sorted(overlap) == list(range(1, 9))
    for it in plain:
        (lr_a, loss_a, _), (lr_b, loss_b, _) = overlap[it], plain[it]
        assert lr_a == lr_b
        assert abs(float(loss_a) - float(loss_b)) <= 2e-2 * float(loss_b), (it, loss_a, loss_b)

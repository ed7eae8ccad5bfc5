"""Context-parallel building blocks in one process: the zig-zag split and its inverse, the
LSE merge and the block backward that takes the merged output and LSE."""
import torch

from megatron_lite.context_parallel.kernels import BlockKernel, _math_forward, merge_
from megatron_lite.context_parallel.split import (
    gather_sequence,
    split_batch,
    split_sequence,
    zigzag_positions,
)


def test_zigzag_split_holds_chunks_r_and_mirror():
    x = torch.arange(16).view(1, 16)
    assert split_sequence(x, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert split_sequence(x, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert split_sequence(x, 4, 1).tolist() == [[2, 3, 12, 13]]
    assert zigzag_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    for cp in (1, 2, 4):
        parts = [split_sequence(x, cp, r) for r in range(cp)]
        assert torch.equal(gather_sequence(parts) if cp > 1 else parts[0], x)


def test_split_batch_keeps_true_positions_and_whole_token_count():
    tokens = torch.arange(8).view(1, 8)
    mask = torch.tensor([[1.0, 1, 0, 1, 1, 1, 1, 0]])
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": mask}
    out = split_batch(batch, 2, 1)
    assert out["tokens"].tolist() == [[2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[2, 3, 4, 5]]
    assert out["labels"].tolist() == [[3, 4, 5, 6]]
    assert out["loss_mask"].tolist() == [[0.0, 1, 1, 1]]
    assert float(out["cp_num_tokens"]) == 6.0


def test_block_kernel_backward_with_merged_lse_is_exact():
    """Two key blocks, merged by LSE, give dense attention's output and gradients."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64)
    kernel = BlockKernel("math", 8 ** -0.5)
    ref_out, ref_lse, _ = kernel.forward(q, k, v, False)
    o1, l1, _ = kernel.forward(q, k[:, :, :5], v[:, :, :5], False)
    o2, l2, _ = kernel.forward(q, k[:, :, 5:], v[:, :, 5:], False)
    out, lse = o1.float(), l1.clone()
    merge_(out, lse, o2, l2)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    dout = torch.randn_like(q)
    ref = kernel.backward(dout, q, k, v, ref_out, ref_lse, False)
    a = kernel.backward(dout, q, k[:, :, :5], v[:, :, :5], ref_out, ref_lse, False)
    b = kernel.backward(dout, q, k[:, :, 5:], v[:, :, 5:], ref_out, ref_lse, False)
    torch.testing.assert_close(a[0] + b[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([a[1], b[1]], 2), ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([a[2], b[2]], 2), ref[2], rtol=1e-5, atol=1e-6)


def test_block_dropout_backward_is_the_gradient_of_its_forward():
    """With dropout the mask is redrawn from the block's seed: the math kernel's backward,
    fed the forward's own output and LSE, is the exact gradient of that forward (gradcheck)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kernel = BlockKernel("math", 8 ** -0.5, dropout_p=0.3)
    torch.manual_seed(5)
    out, lse, seed = kernel.forward(q.detach(), k.detach(), v.detach(), True)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dq, dk, dv = kernel.backward(dout, q.detach(), k.detach(), v.detach(), out, lse, True, seed)

    ref = _math_forward(q, k, v, True, 8 ** -0.5, 0.3, seed)[0]
    redrawn = kernel.forward(q.detach(), k.detach(), v.detach(), True)[0]  # a new seed: another mask
    assert not torch.allclose(ref, redrawn.double())
    ref.backward(dout)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for mine, auto in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(mine.double(), auto, rtol=1e-5, atol=1e-6)

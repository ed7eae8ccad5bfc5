"""The replay node of models/cuda_graphs.py on CPU. Stand-ins re-run each layer where a CUDA
graph would replay and, like a graph, run no Python side effects (the fused wgrad's
`grad_added_to_main_grad` flag is cleared after them): gradients must reach DDP's main_grad
exactly as in the eager run, over micro-batches, the flag set by the replay itself."""

import torch

from megatron_lite.data_parallel.ddp import DDPConfig, DistributedDataParallel
from megatron_lite.distributed.parallel_state import ParallelState
from megatron_lite.models.cuda_graphs import (
    BlockGraphs,
    _LayerGraph,
    _Slot,
    release_cuda_graphs,
)
from tests.cuda_graph_stand_ins import stand_in_graphs
from tests.model_utils import build, tiny_batch, tiny_config


def _main_grads(graphed: bool):
    ps = ParallelState.create()
    cfg = tiny_config("gpt", gradient_accumulation_fusion=True)
    model = build(cfg, ps)
    ddp = DistributedDataParallel(model, ps, DDPConfig(overlap_grad_reduce=True))
    if graphed:
        block = model.decoder
        graphs = stand_in_graphs(list(block.layers), torch.zeros(16, 2, cfg.hidden_size))
        assert graphs[0].fused, "the test needs fused weights"
        block.cuda_graphs, block.cuda_graphs_enabled = BlockGraphs([_Slot(graphs, None)]), True
    losses = []
    for i in range(3):
        tokens, labels = tiny_batch(cfg, seed=i)
        ddp.enable_grad_sync(i == 2)
        loss = ddp(tokens, labels=labels).mean()
        loss.backward()
        losses.append(loss.item())
    ddp.finish_grad_sync()
    return losses, {n: (p.main_grad.clone(), p.grad) for n, p in model.named_parameters()}


def test_replayed_layers_give_the_eager_losses_and_main_grads():
    eager_losses, eager = _main_grads(graphed=False)
    losses, graphed = _main_grads(graphed=True)
    assert losses == eager_losses
    assert graphed.keys() == eager.keys()
    for name, (main_grad, grad) in graphed.items():
        assert grad is None, name
        assert torch.equal(main_grad, eager[name][0]), name
        assert main_grad.abs().sum() > 0, name


def test_a_changed_input_shape_is_one_clear_error():
    ps = ParallelState.create()
    cfg = tiny_config("gpt")
    model = build(cfg, ps)
    graphs = BlockGraphs([_Slot([_LayerGraph(layer, torch.zeros(16, 2, cfg.hidden_size), object(), object())
                                 for layer in model.decoder.layers], None)])
    try:
        graphs.run(torch.zeros(8, 2, cfg.hidden_size), None)
    except RuntimeError as e:
        assert str(e).startswith("CUDA graphs were captured for layer inputs of shape (16, 2, 64), not "
                                 "(8, 2, 64)"), e
    else:
        raise AssertionError("no error")


def test_the_layers_forward_pre_hooks_run_before_each_replay():
    """What a replay skips and the distributed optimizer's overlapped param gather needs."""
    ps = ParallelState.create()
    cfg = tiny_config("gpt")
    model = build(cfg, ps)
    calls = []
    for i, layer in enumerate(model.decoder.layers):
        layer.mlp.linear_fc1.register_forward_pre_hook(lambda m, args, i=i: calls.append(("fc1", i)))
        layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: calls.append(("layer", i)),
                                        with_kwargs=True)
    graphs = stand_in_graphs(list(model.decoder.layers), torch.zeros(16, 2, cfg.hidden_size))
    calls.clear()  # the stand-ins' setup called the layers
    BlockGraphs([_Slot(graphs, None)]).run(torch.zeros(16, 2, cfg.hidden_size), None)
    assert calls == [("layer", 0), ("fc1", 0), ("layer", 1), ("fc1", 1)]


def test_release_frees_every_graph_and_disarms_the_block():
    """What the teardown calls before destroy_process_group, which hangs on live NCCL graphs."""
    ps = ParallelState.create()
    cfg = tiny_config("gpt")
    model = build(cfg, ps)
    block = model.decoder
    graphs = stand_in_graphs(list(block.layers), torch.zeros(16, 2, cfg.hidden_size))
    block.cuda_graphs, block.cuda_graphs_enabled = BlockGraphs([_Slot(graphs, None)]), True
    assert release_cuda_graphs(model) == 1
    assert [g.resets for g in graphs] == [["fwd", "bwd"]] * len(graphs)
    assert block.cuda_graphs is None and not block.cuda_graphs_enabled
    assert release_cuda_graphs(model) == 0


def _pipelined_grads(slots: int | None):
    """Two micro-batches through the block at once, as a pipeline stage holds them (forward 0,
    forward 1, backward 0, backward 1), eagerly (slots None) or replayed from `slots` copies of
    the stand-in graphs: (input grads, main grads)."""
    ps = ParallelState.create()
    cfg = tiny_config("gpt", gradient_accumulation_fusion=True)
    model = build(cfg, ps)
    ddp = DistributedDataParallel(model, ps, DDPConfig(overlap_grad_reduce=True))
    block = model.decoder
    if slots is not None:
        copies = [_Slot(stand_in_graphs(list(block.layers), torch.zeros(16, 2, cfg.hidden_size)), None)
                  for _ in range(slots)]
        block.cuda_graphs, block.cuda_graphs_enabled = BlockGraphs(copies), True
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(16, 2, cfg.hidden_size, generator=gen, requires_grad=True) for _ in range(2)]
    outs = [block(x) for x in inputs]  # [s, b, h] each
    if slots is not None:
        assert [c.busy for c in copies] == [True] * min(slots, 2) + [False] * (slots - 2)
    ddp.enable_grad_sync(False)
    for i, out in enumerate(outs):
        ddp.enable_grad_sync(i == 1)
        out.backward(torch.ones_like(out))
    ddp.finish_grad_sync()
    if slots is not None:
        assert not any(c.busy for c in copies)
    return [x.grad for x in inputs], {n: p.main_grad.clone() for n, p in model.named_parameters()
                                      if n.startswith("decoder.layers")}


def test_two_micro_batches_in_flight_replay_from_two_slots_or_fall_back_to_eager():
    """Pipeline parallelism: each micro-batch in flight has a copy of the graphs (a slot), whose
    outputs survive the other's replays; with too few slots the extra one runs eagerly."""
    eager_dx, eager = _pipelined_grads(None)
    for slots in (2, 3, 1):
        dx, main = _pipelined_grads(slots)
        for a, b in zip(dx, eager_dx):
            assert torch.equal(a, b), slots
        assert main.keys() == eager.keys()
        for name, g in main.items():
            assert torch.equal(g, eager[name]), (slots, name)
            assert g.abs().sum() > 0, name

"""CPU stand-ins for the CUDA graphs of models/cuda_graphs.py: each "replay" re-runs the layer
eagerly on the static buffers and, like a graph, runs none of the Python side effects (module
pre-hooks; the fused wgrad's `grad_added_to_main_grad` flag is cleared after it), so the replay
node's bookkeeping is what the tests check."""
from collections import OrderedDict

import torch

from megatron_lite.models.cuda_graphs import BlockGraphs, _LayerGraph, _scratch_main_grads, _Slot


class _StandIn:
    kind = ""  # "fwd" or "bwd": what reset() records

    def __init__(self, g):
        self.g = g

    def reset(self):
        self.g.resets.append(self.kind)


class _Forward(_StandIn):
    kind = "fwd"

    def replay(self):
        g = self.g
        hooks = [(m, m._forward_pre_hooks) for m in g.layer.modules()]
        try:
            for m, _ in hooks:  # a graph replays kernels: no module hooks either
                m._forward_pre_hooks = OrderedDict()
            with torch.enable_grad():
                g.live = g.layer(g.x, g.slot.rope if g.slot is not None else None)  # [s, b, h]
        finally:
            for m, h in hooks:
                m._forward_pre_hooks = h
        g.out.copy_(g.live.detach())


class _Backward(_StandIn):
    kind = "bwd"

    def replay(self):
        g = self.g
        grads = torch.autograd.grad(g.live, (g.x, *g.params), g.grad_out, allow_unused=True)
        g.grad_x.copy_(grads[0])
        for dst, src in zip(g.grad_params, grads[1:]):
            dst.copy_(src)
        for p in g.params:
            p.grad_added_to_main_grad = False  # a graph replays kernels, not Python


def stand_in_graphs(layers, x_like, rope=None):
    """`_LayerGraph`s of `layers` for inputs like `x_like` `[s, b, h]`, replayed by stand-ins."""
    graphs = []
    for layer in layers:
        g = _LayerGraph(layer, x_like, fwd=object(), bwd=object())
        g.fwd, g.bwd, g.resets = _Forward(g), _Backward(g), []
        with _scratch_main_grads(g.params):  # which weights fuse, without touching main_grad
            out = layer(g.x, rope)
            torch.autograd.grad(out, (g.x, *g.params), torch.zeros_like(out), allow_unused=True)
            g.fused = [p for p in g.params if getattr(p, "grad_added_to_main_grad", False)]
        g.out, g.grad_out, g.grad_x = torch.zeros_like(out), torch.zeros_like(out), torch.zeros_like(g.x)
        g.grad_params = tuple(torch.zeros_like(p) for p in g.params)
        graphs.append(g)
    return graphs


def stand_in_capture(layers, x, rope, rng_tracker, slots=1) -> BlockGraphs:
    """What BlockGraphs.capture returns, with stand-ins for the graphs (same signature)."""
    made = []
    for _ in range(slots):
        rope_static = None if rope is None else tuple(t.detach().clone() for t in rope)
        made.append(_Slot(stand_in_graphs(layers, x, rope_static), rope_static))
    return BlockGraphs(made)

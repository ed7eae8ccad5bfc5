"""Per-layer CUDA graphs for training (`--cuda-graph-impl local`, or Megatron's older
`--enable-cuda-graph`, with `--cuda-graph-scope full`): each transformer layer's forward and
backward are captured once as two CUDA graphs and replayed for every later micro-batch, so the
host launches one graph where it launched a layer's ~50 kernels and ~10 collectives one by one.
That is what a tensor-parallel step on fast GPUs is bound by (issue 13: a TP2 step of GPT 1.3B
on 2xH200 took as long with its communication replaced by local copies).

Capture (`BlockGraphs.capture`) follows torch.cuda.make_graphed_callables: a warm-up forward
and backward of every layer on a side stream, then every layer's forward graph in layer order
and every backward graph in reverse order, all in one memory pool (the order they run in, so
the pool's blocks are reused as in eager execution). It differs where training needs it:

* `capture_error_mode="thread_local"`: under torch's default "global" mode a CUDA call that is
  unsafe during a capture fails in any thread of the process, and the NCCL watchdog queries
  events all the time (a TP2 capture never finished that way; tools/bench/cuda_graph_probe.py).
* The RNG tracker's states are registered with every graph (the tracker is graph-safe,
  distributed/random.py), so dropout inside TP regions draws fresh masks at each replay, as
  the default generator's dropout does.
* Gradient-accumulation fusion: the weight-gradient GEMMs are captured writing into the
  persistent fp32 `main_grad` buffers. A replay does not repeat the Python side effect that
  tells DDP so (`grad_added_to_main_grad`), so the replay sets it for the parameters whose
  capture set it. The warm-up runs with each `main_grad` swapped for a scratch buffer, so
  that it accumulates nothing into the real ones.
* The RNG states are saved before the warm-up and restored after the capture: a run with
  graphs draws the same numbers as one without.

Forward pre-hooks on a layer's modules (the distributed optimizer's param-gather waits under
`--overlap-param-gather`) are called before its replay, as calling the modules would; the
warm-up has already waited for the gathers in flight, so none is waited for inside a capture.

A layer's graphs hold one micro-batch's activations in static buffers: its backward must run
before its next forward, which holds without pipeline parallelism (forward and backward of
each micro-batch in turn). Validation refuses the combinations this does not cover
(config/validation.py). Layers run eagerly outside training (evaluation, no grad).
"""
from __future__ import annotations

import contextlib
import gc

import torch

# Warm-up iterations before capture (make_graphed_callables' default): initialises the side
# stream's cuBLAS workspace and the kernels' lazy state outside the capture.
_WARMUP_ITERS = 3


class _LayerGraph:
    """One layer's forward and backward graphs with their static inputs and outputs."""

    def __init__(self, layer: torch.nn.Module, x: torch.Tensor, fwd=None, bwd=None):
        self.layer = layer
        self.params = tuple(p for p in layer.parameters() if p.requires_grad)
        self.x = torch.zeros_like(x).requires_grad_(True)  # [s(/tp), b, h] static input
        # fwd/bwd: anything with replay() (tests on CPU stand in for the CUDA graphs)
        self.fwd = torch.cuda.CUDAGraph() if fwd is None else fwd
        self.bwd = torch.cuda.CUDAGraph() if bwd is None else bwd
        self.out = self.grad_out = self.grad_x = None
        self.grad_params: tuple = ()
        self.fused: list[torch.nn.Parameter] = []  # params whose wgrad the graph puts in main_grad
        # The layer's modules' forward pre-hooks, which a replay would skip: the distributed
        # optimizer's waits for its overlapped param all-gather (data_parallel/ddp.py).
        self.pre_hooks = [(m, hook, hid in m._forward_pre_hooks_with_kwargs)
                          for m in layer.modules() for hid, hook in m._forward_pre_hooks.items()]


class _Replay(torch.autograd.Function):
    """A captured layer as one autograd node: inputs x and the layer's parameters (so that
    their AccumulateGrad nodes, and DDP's hooks on them, run as in eager execution)."""

    @staticmethod
    def forward(ctx, graph: _LayerGraph, x: torch.Tensor, *params):
        if graph.x.data_ptr() != x.data_ptr():
            graph.x.copy_(x)
        graph.fwd.replay()
        ctx.graph = graph
        return graph.out.detach()  # [s(/tp), b, h], overwritten by this layer's next replay

    @staticmethod
    def backward(ctx, grad_out):
        g = ctx.graph
        if g.grad_out.data_ptr() != grad_out.data_ptr():
            g.grad_out.copy_(grad_out)
        g.bwd.replay()
        for p in g.fused:
            p.grad_added_to_main_grad = True  # the side effect the replay does not repeat
        grads = tuple(None if b is None else b.detach() for b in g.grad_params)
        return (None, g.grad_x.detach(), *grads)


@contextlib.contextmanager
def _scratch_main_grads(params):
    """Point every param's `main_grad` at a zeroed scratch copy for the block."""
    real = {p: p.main_grad for p in params if hasattr(p, "main_grad")}
    try:
        for p, g in real.items():
            p.main_grad = torch.zeros_like(g)
        yield
    finally:
        for p, g in real.items():
            p.main_grad = g
            if hasattr(p, "grad_added_to_main_grad"):
                p.grad_added_to_main_grad = False


class BlockGraphs:
    """The captured layers of one TransformerBlock; `run` replays them in layer order."""

    def __init__(self, graphs: list[_LayerGraph], rope_static):
        self.graphs, self.rope = graphs, rope_static  # rope: static (cos, sin) or None

    @classmethod
    def capture(cls, layers, x: torch.Tensor, rope, rng_tracker) -> BlockGraphs:
        """Capture `layers` for inputs shaped like `x` `[s(/tp), b, h]` and `rope` (a
        (cos, sin) pair `[s, b, 1, d]`, or None); the values are not used."""
        graphs = [_LayerGraph(layer, x) for layer in layers]
        rope_static = None if rope is None else tuple(t.detach().clone() for t in rope)
        generators = rng_tracker.generators() if rng_tracker is not None else []
        device = x.device
        torch.cuda.synchronize(device)
        saved = (torch.cuda.get_rng_state(device),
                 rng_tracker.state_dict() if rng_tracker is not None else None)
        side = torch.cuda.Stream(device)
        for g in graphs:  # one layer at a time: its scratch main grads only
            with _scratch_main_grads(g.params), torch.cuda.stream(side):
                for _ in range(_WARMUP_ITERS):
                    out = g.layer(g.x, rope_static)
                    torch.autograd.grad(out, (g.x, *g.params), torch.zeros_like(out), allow_unused=True)
        torch.cuda.synchronize(device)
        pool = torch.cuda.graph_pool_handle()
        for g in graphs:
            for gen in generators:
                g.fwd.register_generator_state(gen)
                g.bwd.register_generator_state(gen)
            with torch.cuda.graph(g.fwd, pool=pool, capture_error_mode="thread_local"):
                g.out = g.layer(g.x, rope_static)
        for g in reversed(graphs):
            g.grad_out = torch.zeros_like(g.out)
            with torch.cuda.graph(g.bwd, pool=pool, capture_error_mode="thread_local"):
                grads = torch.autograd.grad(g.out, (g.x, *g.params), g.grad_out, allow_unused=True)
            g.grad_x, g.grad_params = grads[0], tuple(grads[1:])
            g.fused = [p for p in g.params if getattr(p, "grad_added_to_main_grad", False)]
            for p in g.fused:
                p.grad_added_to_main_grad = False
        torch.cuda.set_rng_state(saved[0], device)
        if rng_tracker is not None:
            rng_tracker.load_state_dict(saved[1])
        return cls(graphs, rope_static)

    def run(self, x: torch.Tensor, rope) -> torch.Tensor:
        """The layers' forward by replay: `[s(/tp), b, h] -> [s(/tp), b, h]`."""
        if self.graphs and x.shape != self.graphs[0].x.shape:
            raise RuntimeError(f"CUDA graphs were captured for layer inputs of shape "
                               f"{tuple(self.graphs[0].x.shape)}, not {tuple(x.shape)}: the micro-batch "
                               "size and sequence length must stay fixed with --cuda-graph-impl local")
        if rope is not None:
            for dst, src in zip(self.rope, rope):
                dst.copy_(src)  # one copy per block and micro-batch, shared by its layers
        for g in self.graphs:
            for module, hook, with_kwargs in g.pre_hooks:  # as calling the modules would
                hook(module, (), {}) if with_kwargs else hook(module, ())
            x = _Replay.apply(g, x, *g.params)
        return x


def release_cuda_graphs(model: torch.nn.Module) -> int:
    """Free every captured graph inside `model` and disarm its blocks; returns how many blocks
    had graphs. Collective in effect: call it on every rank before destroying the process
    groups, since a live graph holds the NCCL communicators its collectives were captured on
    and destroy_process_group then hangs (seen on 2xH200 at TP2; torchtitan frees its graphs
    before closing for the same reason)."""
    blocks = [m for m in model.modules() if getattr(m, "cuda_graphs", None) is not None]
    if not blocks:
        return 0
    if torch.cuda.is_initialized():  # CPU stand-ins in tests have no device to wait for
        torch.cuda.synchronize()
    for block in blocks:
        for g in block.cuda_graphs.graphs:
            g.fwd.reset()
            g.bwd.reset()
        block.cuda_graphs, block.cuda_graphs_enabled = None, False
    gc.collect()  # autograd nodes that saw a replay hold their graph in a reference cycle
    return len(blocks)


def enable_cuda_graphs(model: torch.nn.Module) -> int:
    """Arm every transformer block inside `model` (wrappers included) to capture its layers at
    its next training forward; returns how many blocks."""
    blocks = [m for m in model.modules() if hasattr(type(m), "enable_cuda_graphs")]
    for block in blocks:
        block.enable_cuda_graphs()
    return len(blocks)

"""Per-layer CUDA graphs for training (`--cuda-graph-impl local`, or Megatron's older
`--enable-cuda-graph`, with `--cuda-graph-scope full`): each transformer layer's forward and
backward are captured once as two CUDA graphs and replayed for every later micro-batch, so the
host launches one graph where it launched a layer's ~50 kernels and ~10 collectives one by one.
That is what a tensor-parallel step on fast GPUs is bound by (issue 13: a TP2 step of GPT 1.3B
on 2xH200 took as long with its communication replaced by local copies).

Capture (`BlockGraphs.capture`) follows torch.cuda.make_graphed_callables: a warm-up forward
and backward of every layer on a side stream, then every layer's forward graph in layer order
and every backward graph in reverse order, all in one memory pool per slot (below; the order
they run in, so the pool's blocks are reused as in eager execution). It differs where training
needs it:

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

A layer's graphs hold one micro-batch's activations in static buffers and in their memory
pool, so a block is captured in as many copies (slots) as it holds micro-batches at once: one
without pipeline parallelism (each micro-batch's forward and backward in turn), and under a
pipeline schedule the most that schedule ever holds of that chunk
(schedules.in_flight_per_chunk). Each slot has a pool of its own: within a slot the replays
come in the capture order, across slots they interleave. A forward takes a free slot and the
backward of its first layer frees it; when none is free (a larger batch than the schedule the
slots were counted for, or --use-dpp's readiness-driven order holding more of a chunk than the
static one) the layers run eagerly. The block's output and input gradient leave it
as copies, because a pipeline send of them may still be pending when the slot is replayed
again. The capture skips torch.cuda.graph's device-wide synchronize: under pipeline parallelism
it comes in the middle of a step (at the chunk's first forward after arming), where a receive
already posted may complete only after this rank's later sends, and it orders the capture stream
after the current one instead. Validation refuses the combinations this does not cover
(config/cuda_graph_flags.py). Layers run eagerly outside training (evaluation, no grad).
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
        self.slot: _Slot | None = None
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
        grad_x = g.grad_x.detach()
        if g is g.slot.graphs[0]:  # the slot's last replay: the micro-batch leaves the block
            g.slot.busy = False
            grad_x = grad_x.clone()  # may be sent to the previous stage (see BlockGraphs.run)
        return (None, grad_x, *grads)


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


class _Slot:
    """One set of a block's layer graphs, with a memory pool of its own: the activations of one
    micro-batch in flight. A slot is busy from its forward replay until its first layer's
    backward replay. Within a slot the replays always come in the capture order (every layer
    forward, then every backward in reverse), which is what lets its graphs share one pool."""

    def __init__(self, graphs: list[_LayerGraph], rope_static):
        self.graphs, self.rope, self.busy = graphs, rope_static, False
        for g in graphs:
            g.slot = self


@contextlib.contextmanager
def _capturing(graph, pool, stream):
    """torch.cuda.graph without its device-wide synchronize (and empty_cache): under pipeline
    parallelism a capture can come in the middle of a step, with receives posted that only a
    peer's later progress completes, and a device synchronize would wait for them forever. The
    capture stream is ordered after the current one instead."""
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()
    current.wait_stream(stream)


class BlockGraphs:
    """The captured layers of one TransformerBlock in `slots` copies (micro-batches in flight
    at once: 1 without pipeline parallelism); `run` replays the layers of a free slot."""

    def __init__(self, slots: list[_Slot]):
        self.slots = slots

    @property
    def graphs(self) -> list[_LayerGraph]:
        return [g for slot in self.slots for g in slot.graphs]

    @classmethod
    def capture(cls, layers, x: torch.Tensor, rope, rng_tracker, slots: int = 1) -> BlockGraphs:
        """Capture `layers` for inputs shaped like `x` `[s(/tp), b, h]` and `rope` (a
        (cos, sin) pair `[s, b, 1, d]`, or None), `slots` times; the values are not used."""
        generators = rng_tracker.generators() if rng_tracker is not None else []
        device = x.device
        saved = (torch.cuda.get_rng_state(device),
                 rng_tracker.state_dict() if rng_tracker is not None else None)
        made = [_Slot([_LayerGraph(layer, x) for layer in layers],
                      None if rope is None else tuple(t.detach().clone() for t in rope))
                for _ in range(slots)]
        _warm_up(made[0], device)
        stream = torch.cuda.Stream(device)
        for slot in made:
            _capture_slot(slot, generators, torch.cuda.graph_pool_handle(), stream)
        torch.cuda.set_rng_state(saved[0], device)
        if rng_tracker is not None:
            rng_tracker.load_state_dict(saved[1])
        return cls(made)

    def run(self, x: torch.Tensor, rope) -> torch.Tensor | None:
        """The layers' forward by replay: `[s(/tp), b, h] -> [s(/tp), b, h]`; None when every
        slot is busy (more micro-batches in flight than captured for: the caller runs the
        layers eagerly)."""
        first = self.slots[0].graphs
        if first and x.shape != first[0].x.shape:
            raise RuntimeError(f"CUDA graphs were captured for layer inputs of shape "
                               f"{tuple(first[0].x.shape)}, not {tuple(x.shape)}: the micro-batch "
                               "size and sequence length must stay fixed with --cuda-graph-impl local")
        slot = next((s for s in self.slots if not s.busy), None)
        if slot is None or not slot.graphs:
            return None
        slot.busy = True
        if rope is not None:
            for dst, src in zip(slot.rope, rope):
                dst.copy_(src)  # one copy per block and micro-batch, shared by its layers
        for g in slot.graphs:
            for module, hook, with_kwargs in g.pre_hooks:  # as calling the modules would
                hook(module, (), {}) if with_kwargs else hook(module, ())
            x = _Replay.apply(g, x, *g.params)
        # A copy leaves the block: the static output is rewritten when the slot is reused,
        # possibly while a pipeline send of this micro-batch's output is still pending.
        return x.clone()


def _warm_up(slot: _Slot, device) -> None:
    """make_graphed_callables' warm-up, on a side stream: cuBLAS workspaces and lazily
    initialised kernels and communicators, outside any capture. One layer at a time, each with
    scratch main grads, so nothing accumulates into the real ones."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream())
    for g in slot.graphs:
        with _scratch_main_grads(g.params), torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):
                out = g.layer(g.x, slot.rope)
                torch.autograd.grad(out, (g.x, *g.params), torch.zeros_like(out), allow_unused=True)
    torch.cuda.current_stream().wait_stream(side)


def _capture_slot(slot: _Slot, generators, pool, stream) -> None:
    """Every layer's forward graph in layer order, then every backward graph in reverse (the
    order they replay in), all in the slot's pool."""
    for g in slot.graphs:
        for gen in generators:
            g.fwd.register_generator_state(gen)
            g.bwd.register_generator_state(gen)
        with _capturing(g.fwd, pool, stream):
            g.out = g.layer(g.x, slot.rope)
    for g in reversed(slot.graphs):
        g.grad_out = torch.zeros_like(g.out)
        with _capturing(g.bwd, pool, stream):
            grads = torch.autograd.grad(g.out, (g.x, *g.params), g.grad_out, allow_unused=True)
        g.grad_x, g.grad_params = grads[0], tuple(grads[1:])
        g.fused = [p for p in g.params if getattr(p, "grad_added_to_main_grad", False)]
        for p in g.fused:
            p.grad_added_to_main_grad = False


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
        for g in block.cuda_graphs.graphs:  # every slot's
            g.fwd.reset()
            g.bwd.reset()
        block.cuda_graphs, block.cuda_graphs_enabled = None, False
    gc.collect()  # autograd nodes that saw a replay hold their graph in a reference cycle
    return len(blocks)


def enable_cuda_graphs(model: torch.nn.Module, slots: int = 1) -> int:
    """Arm every transformer block inside `model` (wrappers included) to capture its layers,
    `slots` times (schedules.in_flight_per_chunk), at its next training forward; returns how
    many blocks."""
    blocks = [m for m in model.modules() if hasattr(type(m), "enable_cuda_graphs")]
    for block in blocks:
        block.enable_cuda_graphs(slots)
    return len(blocks)

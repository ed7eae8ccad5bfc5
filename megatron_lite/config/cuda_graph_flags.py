"""Megatron-LM's CUDA-graph flags (issue 13): `--cuda-graph-impl local` (or the older
`--enable-cuda-graph`) captures each transformer layer's forward and backward once, after
`--cuda-graph-warmup-steps` eager iterations, and replays them (models/cuda_graphs.py).
`--cuda-graph-impl transformer_engine` / `--external-cuda-graph` need Transformer Engine and
are refused by name, as are the scopes other than whole layers and the layouts the per-layer
graphs do not cover yet. `--te-rng-tracker` asks for the graph-safe RNG tracker, which CUDA
graphs use anyway (distributed/random.py: the same random numbers as the other tracker)."""
from __future__ import annotations

from collections.abc import Callable

from megatron_lite.config.errors import ConfigError

LOCAL = "local"
# A layer's graphs keep the activations of a fixed number of micro-batches (one per copy of the
# block's graphs), and their input shapes must not change. Each entry: (flag, is it on, why).
_NOT_YET = (
    ("--context-parallel-size > 1", lambda a: a.context_parallel_size > 1,
     "the ring attention's point-to-point exchanges are not captured"),
    ("--recompute-granularity", lambda a: a.recompute_granularity is not None,
     "recomputation re-runs the forward inside the backward"),
    ("--use-torch-fsdp2", lambda a: a.use_torch_fsdp2, "FSDP2 gathers parameters in hooks a replay skips"),
)


def add_cuda_graph_args(group) -> None:
    group.add_argument("--cuda-graph-impl", type=str, default="none",
                       choices=["none", LOCAL, "transformer_engine"],
                       help="CUDA graphs: local captures each transformer layer's forward and backward "
                       "after --cuda-graph-warmup-steps and replays them (transformer_engine is refused: "
                       "it needs Transformer Engine).")
    group.add_argument("--enable-cuda-graph", action="store_true",
                       help="Deprecated in Megatron-LM: --cuda-graph-impl local.")
    group.add_argument("--external-cuda-graph", action="store_true",
                       help="Deprecated in Megatron-LM: --cuda-graph-impl transformer_engine (refused).")
    group.add_argument("--cuda-graph-scope", type=str, nargs="+", default=["full"],
                       help="What a CUDA graph holds: full (a whole transformer layer) is supported.")
    group.add_argument("--cuda-graph-warmup-steps", type=int, default=3,
                       help="Eager iterations before the layers are captured.")
    group.add_argument("--te-rng-tracker", action="store_true",
                       help="The graph-safe RNG tracker (same random numbers; used with CUDA graphs anyway).")


def check_cuda_graph_flags(args, cuda_available: bool, warn: Callable[[str], None]) -> None:
    """Runs after the parallel sizes are derived (validation.py)."""
    if args.external_cuda_graph:
        raise ConfigError("--external-cuda-graph (Transformer Engine's make_graphed_callables) is not "
                          "supported by megatron_lite; use --cuda-graph-impl local")
    if args.enable_cuda_graph:
        if args.cuda_graph_impl not in ("none", LOCAL):
            raise ConfigError(f"--enable-cuda-graph contradicts --cuda-graph-impl {args.cuda_graph_impl}")
        warn("--enable-cuda-graph is deprecated; it means --cuda-graph-impl local")
        args.cuda_graph_impl = LOCAL
    if args.cuda_graph_impl == "transformer_engine":
        raise ConfigError("--cuda-graph-impl transformer_engine needs Transformer Engine, which "
                          "megatron_lite does not use; use --cuda-graph-impl local")
    if args.cuda_graph_impl != LOCAL:
        return
    other = [s for s in args.cuda_graph_scope if s != "full"]
    if other:
        raise ConfigError(f"--cuda-graph-scope {' '.join(other)} is not supported by megatron_lite "
                          "(only full: each transformer layer as one graph)")
    if not cuda_available:
        raise ConfigError("--cuda-graph-impl local needs a CUDA GPU")
    for flag, on, why in _NOT_YET:
        if on(args):
            raise ConfigError(f"--cuda-graph-impl local with {flag} is not supported yet ({why})")

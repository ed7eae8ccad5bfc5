"""Megatron-LM's CUDA-graph flags: what is accepted, aliased and refused, each refusal one
line naming the flag (config/cuda_graph_flags.py)."""
import pytest

from megatron_lite.config.arguments import parse_args
from megatron_lite.config.validation import ConfigError, validate_args

BASE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        "--max-position-embeddings 64 --micro-batch-size 2 --mock-data --tokenizer-type NullTokenizer "
        "--vocab-size 128 --train-iters 10 --lr 1e-3")


def make(extra: str, world: int = 1, cuda: bool = True):
    notes = []
    args = validate_args(parse_args(f"{BASE} {extra}".split()), world, cuda_available=cuda, warn=notes.append)
    return args, notes


def test_local_is_accepted_with_its_warmup():
    args, notes = make("--cuda-graph-impl local --cuda-graph-warmup-steps 5")
    assert (args.cuda_graph_impl, args.cuda_graph_warmup_steps, notes) == ("local", 5, [])


def test_enable_cuda_graph_is_the_deprecated_local():
    args, notes = make("--enable-cuda-graph")
    assert args.cuda_graph_impl == "local"
    assert notes == ["--enable-cuda-graph is deprecated; it means --cuda-graph-impl local"]


def test_defaults_leave_graphs_off():
    args, _ = make("")
    assert (args.cuda_graph_impl, args.cuda_graph_warmup_steps, args.te_rng_tracker) == ("none", 3, False)


@pytest.mark.parametrize("extra,world,message", [
    ("--cuda-graph-impl transformer_engine", 1,
     "--cuda-graph-impl transformer_engine needs Transformer Engine"),
    ("--external-cuda-graph", 1,
     "--external-cuda-graph (Transformer Engine's make_graphed_callables) is not"),
    ("--enable-cuda-graph --cuda-graph-impl transformer_engine", 1, "--enable-cuda-graph contradicts"),
    ("--cuda-graph-impl local --cuda-graph-scope attn", 1, "--cuda-graph-scope attn is not supported"),
    ("--cuda-graph-impl local --cuda-graph-warmup-steps -1", 1, "--cuda-graph-warmup-steps must be >= 0"),
    ("--cuda-graph-impl local --context-parallel-size 2", 2,
     "--cuda-graph-impl local with --context-parallel-size > 1 is not supported yet"),
    ("--cuda-graph-impl local --recompute-granularity full --recompute-method uniform "
     "--recompute-num-layers 1", 1,
     "--cuda-graph-impl local with --recompute-granularity is not supported yet"),
])
def test_refusals_name_the_flag(extra, world, message):
    with pytest.raises(ConfigError) as e:
        make(extra, world)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra,world", [
    ("--pipeline-model-parallel-size 2", 2),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --global-batch-size 8", 2),
    ("--tensor-model-parallel-size 2 --sequence-parallel --tp-comm-overlap", 2),
    ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --global-batch-size 8 "
     "--use-dpp", 2),
])
def test_pipelines_and_the_overlapped_tp_rings_are_accepted(extra, world):
    args, notes = make(f"--cuda-graph-impl local {extra}", world)
    assert (args.cuda_graph_impl, notes) == ("local", [])


def test_overlapped_param_gather_is_accepted():
    args, _ = make("--cuda-graph-impl local --use-distributed-optimizer --overlap-grad-reduce "
                   "--overlap-param-gather", 2)
    assert args.cuda_graph_impl == "local" and args.overlap_param_gather


def test_local_needs_cuda():
    with pytest.raises(ConfigError, match="^--cuda-graph-impl local needs a CUDA GPU$"):
        make("--cuda-graph-impl local", cuda=False)

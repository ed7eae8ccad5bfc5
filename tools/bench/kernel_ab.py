"""A/B of one kernel choice: tools/benchmark.py with that choice undone in this process, so both
sides of a comparison run the same code on the same machine (GPU speed differs between
machines by a few percent, more than some of these choices are worth).

    python tools/bench/kernel_ab.py --undo swiglu -- --preset llama-1b --cross-entropy-loss-fusion \
        --num-micro-batches 8

--undo (what runs instead):
  none     nothing undone
  swiglu   SwiGLU compiled by Inductor from its reference (fused/elementwise.py), not fused/swiglu.py
  rmsnorm  RMSNorm compiled by Inductor, not fused/rmsnorm.py
  tied     the tied embedding and head without gradient-accumulation fusion (the bf16 [V, h]
           gradients added by DDP's hook); the other linears keep theirs
Interleave the variants (A B A B) and compare means; README's Performance section lists runs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import megatron_lite.fused.elementwise as elementwise  # noqa: E402
import megatron_lite.models.gpt as gpt  # noqa: E402
import megatron_lite.tensor_parallel.embedding as embedding  # noqa: E402
from megatron_lite.fused.jit import jit_fuser  # noqa: E402

UNDO = ("none", "swiglu", "rmsnorm", "tied")


def undo(choice: str) -> None:
    """Replace one kernel choice in the imported modules (this benchmark process only)."""
    if choice == "swiglu":
        elementwise.triton_swiglu = jit_fuser(elementwise.swiglu.reference)
    elif choice == "rmsnorm":
        elementwise.rms_norm_kernel_available = lambda x, weight: False
    elif choice == "tied":
        gpt.GPTModel._head_is_tied_lookup = lambda self: False
        embedding.accumulates_in_main_grad = lambda weight: False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--undo", choices=UNDO, required=True)
    p.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="after --: tools/benchmark.py's")
    a = p.parse_args()
    rest = a.benchmark_args[1:] if a.benchmark_args[:1] == ["--"] else a.benchmark_args
    undo(a.undo)
    from tools import benchmark

    sys.argv = ["tools/benchmark.py", *rest]
    benchmark.main()


if __name__ == "__main__":
    main()

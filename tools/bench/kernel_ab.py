"""A/B of one kernel choice: tools/benchmark.py with that choice undone in this process, so both
sides of a comparison run the same code on the same machine (GPU speed differs between
machines by a few percent, more than some of these choices are worth).

    python tools/bench/kernel_ab.py --undo swiglu -- --preset llama-1b --cross-entropy-loss-fusion \
        --num-micro-batches 8

--undo (what runs instead):
  none     nothing undone
  swiglu   SwiGLU compiled by Inductor from its reference (fused/elementwise.py), not fused/swiglu.py
  rmsnorm  RMSNorm compiled by Inductor, not fused/rmsnorm.py
  addnorm  the residual add before the pre-MLP norm, and the residual's gradient at the input
           norm, by kernels of their own, not in the norms' (rmsnorm and layernorm undo them too)
  tied     the tied embedding and head without gradient-accumulation fusion (the bf16 [V, h]
           gradients added by DDP's hook); the other linears keep theirs
  layernorm  F.layer_norm, not fused/layernorm.py
  bias     linear biases' gradients by a bf16 reduction added by DDP's hook, not fused
  ce       the cross-entropy by spec §11's max / shift / exp / sum / divide passes, not by ATen's
           log-softmax
  normgrad the Triton norms' gamma/beta gradients summed by ATen and added to main_grad by DDP's
           hook, not by fused/norm_grads.py straight into main_grad
  adamw    the optimizers' clip multiply, torch's fused AdamW and the fp32 main -> bf16 model
           param copy as three passes, not optimizer/fused_adamw.py's one
  rope     RoPE by the compiled rotation of q and k as views (fused/elementwise.py), not
           fused/rope_qkv.py's kernels on the QKV output
Several choices with rounds run each in a fresh process, interleaved (A B A B ...), and print
each one's mean step and TFLOP/s beside the first's (README's Performance section lists runs):

    python tools/bench/kernel_ab.py --undo none,swiglu,rmsnorm --rounds 2 -- --preset llama-1b ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import megatron_lite.fused.elementwise as elementwise  # noqa: E402
import megatron_lite.fused.norm_grads as norm_grads  # noqa: E402
import megatron_lite.models.attention as attention  # noqa: E402
import megatron_lite.models.gpt as gpt  # noqa: E402
import megatron_lite.models.norms as norms  # noqa: E402
import megatron_lite.optimizer.fused_adamw as fused_adamw  # noqa: E402
import megatron_lite.tensor_parallel.cross_entropy as cross_entropy  # noqa: E402
import megatron_lite.tensor_parallel.embedding as embedding  # noqa: E402
import megatron_lite.tensor_parallel.layers as layers  # noqa: E402
from megatron_lite.fused.jit import jit_fuser  # noqa: E402

UNDO = ("none", "swiglu", "rmsnorm", "addnorm", "tied", "layernorm", "bias", "ce", "normgrad", "adamw",
        "rope")


def undo(choice: str) -> None:
    """Replace one kernel choice in the imported modules (this benchmark process only)."""
    if choice == "swiglu":
        elementwise.triton_swiglu = jit_fuser(elementwise.swiglu.reference)
    elif choice == "rmsnorm":
        elementwise.rms_norm_kernel_available = lambda x, weight: False
        norms.rms_norm_kernel_available = lambda x, weight: False
    elif choice == "addnorm":
        norms.Norm.add_and_norm = lambda self, h, residual: None
        norms.Norm.keep_and_norm = lambda self, x: None
    elif choice == "tied":
        gpt.GPTModel._head_is_tied_lookup = lambda self: False
        embedding.accumulates_in_main_grad = lambda weight: False
    elif choice == "layernorm":  # the fused residual add's LayerNorm too (norms.py)
        norms.layer_norm_kernel_available = lambda x, weight, bias: False
    elif choice == "bias":
        # An unfused gradient without the main_grad flag: DDP's hook adds it (layers._bias_grad).
        layers._bias_grad = lambda param, g2d: g2d.sum(0)
    elif choice == "normgrad":  # what fused/rmsnorm.py and layernorm.py did before norm_grads.py
        norm_grads.sum_partials = lambda partial, like, param: partial.sum(0).to(like.dtype)
    elif choice == "adamw":  # read by both optimizers when they are built
        fused_adamw.available = lambda inner, model_copies: False
    elif choice == "rope":
        attention.rope_qkv_available = lambda qkv, cos, per, interleaved: False
    elif choice == "ce":
        gpt.vocab_parallel_cross_entropy = (
            lambda logits, target, group, smoothing=0.0:
            cross_entropy._VocabParallelCrossEntropy.apply(logits, target, group, smoothing))


def interleaved(choices: list[str], rounds: int, rest: list[str]) -> list[tuple[str, dict | None]]:
    """Each choice once per round, in order, each in its own process: (choice, benchmark.py's
    JSON result, or None where the run printed none)."""
    runs = []
    for _ in range(rounds):
        for choice in choices:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--undo", choice, "--", *rest],
                                  capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"--undo {choice}: no result (rc {done.returncode}): {done.stderr.strip()[-400:]}",
                      file=sys.stderr)
            runs.append((choice, json.loads(lines[-1]) if lines else None))
    return runs


def summary(runs: list[tuple[str, dict | None]]) -> list[str]:
    """A line per choice, in first-run order: runs, mean step ms (min-max), mean TFLOP/s/GPU, and
    the first choice's mean step over this one's (above 1: this one is faster)."""
    order = list(dict.fromkeys(choice for choice, _ in runs))
    steps = {c: [r["step_ms"] for x, r in runs if x == c and r] for c in order}
    tflops = {c: [r["tflops_per_gpu"] for x, r in runs if x == c and r] for c in order}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = steps[order[0]]
    lines = []
    for c in order:
        if not steps[c]:
            lines.append(f"--undo {c:9s} no result")
            continue
        ratio = f"{mean(base) / mean(steps[c]):.4f}x" if base else "-"
        lines.append(f"--undo {c:9s} {len(steps[c])} runs  step {mean(steps[c]):.2f} ms "
                     f"({min(steps[c]):.2f}-{max(steps[c]):.2f})  {mean(tflops[c]):.1f} TFLOP/s/GPU  "
                     f"{ratio} vs --undo {order[0]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--undo", required=True, help=f"one of {', '.join(UNDO)}, or several, comma-separated")
    p.add_argument("--rounds", type=int, default=1, help="runs of each choice, interleaved")
    p.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="after --: tools/benchmark.py's")
    a = p.parse_args()
    rest = a.benchmark_args[1:] if a.benchmark_args[:1] == ["--"] else a.benchmark_args
    choices = a.undo.split(",")
    bad = [c for c in choices if c not in UNDO]
    if bad or a.rounds < 1:
        p.error(f"--undo {bad[0]}: not one of {', '.join(UNDO)}" if bad else "--rounds must be >= 1")
    if len(choices) > 1 or a.rounds > 1:
        print("\n".join(summary(interleaved(choices, a.rounds, rest))))
        return
    undo(choices[0])
    from tools import benchmark

    sys.argv = ["tools/benchmark.py", *rest]
    benchmark.main()


if __name__ == "__main__":
    main()

"""The Triton kernels of megatron_lite/fused (SwiGLU, RMSNorm, LayerNorm, each norm with the
residual add or the residual's gradient fused, cross-entropy, RoPE on the QKV output) and
optimizer/fused_adamw.py, run on the CPU by Triton's interpreter, against their PyTorch
references in fp64: outputs and every gradient, fp32 and bf16, shapes that are not block
multiples, AdamW's params, moments and model copy over 3 clipped steps; and tiny GPT and Llama
models with the fused residual adds, a Llama with RoPE on its QKV output, and a
MixedPrecisionOptimizer and a DistributedOptimizer with the fused AdamW pass, against the same
without them (fp32). The GPU tests (tests/gpu/test_fused.py, test_cuda_fused_adamw.py) check
the compiled kernels; this lets a CPU-only CI check their arithmetic and masking. Skipped where
Triton is not installed (the test extra installs it)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

ROOT = Path(__file__).resolve().parents[2]
# fp32: the kernels and the reference differ in summation order only; bf16: one rounding of
# each output (2^-8) with headroom for the gradients' two.
TOLERANCE = {"fp32": 1e-5, "bf16": 1.6e-2}


@pytest.fixture(scope="module")
def errors() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "tests.interpreted.triton_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel,count", [("swiglu", 4), ("rmsnorm", 6), ("layernorm", 6),
                                          ("cross_entropy", 4), ("addrmsnorm", 4), ("addlayernorm", 4),
                                          ("keeprmsnorm", 4), ("keeplayernorm", 4), ("addnorm-model", 2),
                                          ("normgrad", 4), ("normgrad-model", 2), ("adamw", 4),
                                          ("adamw-model", 2), ("adamw-distributed", 2), ("ropeqkv", 6),
                                          ("ropeqkv-model", 1)])
def test_kernel_matches_fp64_reference_under_the_interpreter(errors, kernel, count):
    cases = {name: err for name, err in errors.items() if name.startswith(kernel + " ")}
    assert len(cases) == count, errors
    for name, err in cases.items():
        assert err < TOLERANCE[name.split()[1]], (name, err)

#!/usr/bin/env bash
# Issue 13: where the host time of a tensor-parallel step goes, sampled with py-spy (Python and
# native frames, idle waits included), next to the same run's timing without the profiler.
#   PY_SPY=/path/to/py-spy bash tools/bench/host_profile.sh OUTDIR [TP] [MICRO_BATCH]
# tools/benchmark.py, GPT 1.3B, seq 2048, 4 micro-batches, TP ranks on TP GPUs (default 2, SP
# on), micro-batch 4 unless given. Writes OUTDIR/stacks_tpN_sSEQ.txt (py-spy's collapsed stacks of
# every rank and thread) and prints the busiest threads' inclusive and self shares
# (tools/bench/collapsed_stacks.py: each rank's main thread and autograd's backward thread). py-spy is not a dependency: carry its
# wheel (pip download py-spy) and point PY_SPY at the unpacked binary. SPY_NATIVE= (empty) leaves
# out native frames (py-spy 0.4.3 segfaulted with them on a 2-rank torchrun); SEQ sets the sequence
# length (a short one, e.g. 128, leaves the GPU nearly idle: the step is then the host's time).
set -uo pipefail
out=${1:?usage: host_profile.sh OUTDIR [TP] [MICRO_BATCH]}; tp=${2:-2}; mbs=${3:-4}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
spy=${PY_SPY:-py-spy}
sp=(); [ "$tp" -gt 1 ] && sp=(--sequence-parallel)
bench=(tools/benchmark.py --preset gpt-1.3b --micro-batch-size "$mbs" --num-micro-batches 4 --seq-length "${SEQ:-2048}"
       --tensor-model-parallel-size "$tp" "${sp[@]}")
launch=(torchrun --standalone --nproc_per_node "$tp")
echo "== TP $tp mbs $mbs without the profiler"
timeout 120 "${launch[@]}" "${bench[@]}" --steps 6 --warmup 3 2>&1 | grep -o '"step_ms": [0-9.]*'
echo "== the same under py-spy (its sampling slows the host a little)"
timeout 240 "$spy" record --subprocesses --idle --threads --rate 100 --format raw ${SPY_NATIVE---native} \
  -o "$out/stacks_tp${tp}_s${SEQ:-2048}.txt" -- "${launch[@]}" "${bench[@]}" --steps 12 --warmup 3 2>&1 \
  | grep -o '"step_ms": [0-9.]*\|py-spy> .*Samples.*'
python tools/bench/collapsed_stacks.py "$out/stacks_tp${tp}_s${SEQ:-2048}.txt" --functions --top 25 --threads 4
echo "== the ranks' main threads inside train_step only (startup left out)"
python tools/bench/collapsed_stacks.py "$out/stacks_tp${tp}_s${SEQ:-2048}.txt" --functions --top 25 --threads "$tp" --within train_step

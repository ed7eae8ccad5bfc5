#!/usr/bin/env bash
# Manual GPU check of pipeline parallelism (2 GPUs, nccl): (1) a tiny fp32 GPT on 1 GPU and
# with PP=2 x VPP=2 prints matching lm loss lines; (2) measured pipeline bubble of 1F1B and
# interleaved 1F1B from --pipeline-trace-file next to the theoretical (PP-1)/(VPP*M).
# Usage: bash tools/bench/pipeline_bubble.sh WORKDIR > summary.txt   (logs and traces stay in
# WORKDIR; the summary has every number). Compare "measured" with "schedule with these times"
# (the schedule's bubble given the measured, possibly unbalanced, per-stage compute times).
set -uo pipefail
out=${1:-/tmp/pipeline_bubble}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

TINY="--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 --max-position-embeddings 256
  --tokenizer-type NullTokenizer --vocab-size 1024 --micro-batch-size 2 --global-batch-size 8 --train-iters 10
  --lr 1e-3 --lr-warmup-iters 2 --mock-data --log-interval 2 --eval-iters 1 --seed 1234
  --attention-dropout 0 --hidden-dropout 0"
parity() { name=$1; n=$2; shift 2
  timeout 180 torchrun --standalone --nproc_per_node "$n" pretrain_gpt.py $TINY "$@" > "$out/$name.log" 2>&1
  echo "== $name (rc $?)"; grep -o "iteration *[0-9]*/.*lm loss: [0-9.E+-]*\|lm loss value: [0-9.E+-]*" \
    "$out/$name.log" | sed 's/consumed.*learning rate/lr/'; }
parity tiny_1gpu 1
parity tiny_pp2_vpp2 2 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1

# Bubble: 8 layers of h=2048, s=2048, b=1, bf16; a small vocabulary keeps the last stage's
# output layer from dominating. Step 1 (allocator warm-up) is left out of the statistics.
BIG="--num-layers 8 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048
  --tokenizer-type NullTokenizer --vocab-size 8192 --micro-batch-size 1 --train-iters 12 --lr 1e-4
  --bf16 --mock-data --log-interval 4 --eval-iters 0 --seed 1234 --pipeline-model-parallel-size 2"
bubble() { name=$1; shift; GROUP=()
  [[ " $* " == *" --microbatch-group-size-per-virtual-pipeline-stage 8 "* ]] && GROUP=(--group-size 8)
  timeout 180 torchrun --standalone --nproc_per_node 2 pretrain_gpt.py $BIG "$@" --pipeline-trace-file "$out/$name.json" \
    > "$out/$name.log" 2>&1
  echo "== $name (rc $?) $*"
  grep -o "elapsed time per iteration (ms): [0-9.]*" "$out/$name.log" | tail -1
  python tools/pipeline_trace_stats.py "$out/$name.json" "${GROUP[@]}" | tail -2; }
bubble 1f1b_m4 --global-batch-size 4
bubble vpp2_m4 --global-batch-size 4 --num-layers-per-virtual-pipeline-stage 2
bubble 1f1b_m8 --global-batch-size 8
bubble vpp2_m8 --global-batch-size 8 --num-layers-per-virtual-pipeline-stage 2
bubble vpp4_m8 --global-batch-size 8 --num-layers-per-virtual-pipeline-stage 1
bubble vpp2_m8_breadth --global-batch-size 8 --num-layers-per-virtual-pipeline-stage 2 \
  --microbatch-group-size-per-virtual-pipeline-stage 8
bubble 1f1b_m16 --global-batch-size 16
bubble vpp2_m16 --global-batch-size 16 --num-layers-per-virtual-pipeline-stage 2

#!/usr/bin/env bash
# Manual GPU check (2 GPUs): the same tiny Llama run at TP=1 (1 GPU), TP=2 + SP (nccl, fused
# cross-entropy over the TP group) and DP=2 prints matching lm loss lines in bf16; a GPT run
# in fp16 exercises the dynamic loss scaler. Usage: bash tests/gpu/multi_gpu_smoke.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu_smoke}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
FLAGS="--num-layers 4 --hidden-size 512 --num-attention-heads 8 --group-query-attention --num-query-groups 4
  --seq-length 512 --max-position-embeddings 512 --tokenizer-type NullTokenizer --vocab-size 32000
  --micro-batch-size 4 --global-batch-size 16 --train-iters 40 --lr 1e-3 --lr-warmup-iters 4
  --lr-decay-style cosine --bf16 --mock-data --log-interval 10 --seed 1234"
run() { name=$1; n=$2; shift 2
  torchrun --standalone --nproc_per_node "$n" pretrain_llama.py $FLAGS "$@" > "$out/$name.log" 2>&1
  echo "== $name (rc $?)"; grep -o "iteration *[0-9]*/.*lm loss: [0-9.E+-]*\|grad norm: [0-9.]*" "$out/$name.log" \
    | sed 's/consumed.*learning rate/lr/' | paste - - | head -5; }
run tp1 1
run tp2_sp_cefused 2 --tensor-model-parallel-size 2 --sequence-parallel --cross-entropy-loss-fusion
run dp2 2
torchrun --standalone --nproc_per_node 1 pretrain_gpt.py --num-layers 2 --hidden-size 256 \
  --num-attention-heads 4 --seq-length 256 --max-position-embeddings 256 --micro-batch-size 4 \
  --global-batch-size 8 --train-iters 30 --lr 1e-3 --fp16 --initial-loss-scale 65536 --mock-data \
  --log-interval 10 > "$out/gpt_fp16.log" 2>&1
echo "== gpt_fp16 (rc $?)"; grep -o "lm loss: [0-9.E+-]* | loss scale: [0-9.]* .*" "$out/gpt_fp16.log" | head -4

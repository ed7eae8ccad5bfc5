#!/usr/bin/env bash
# Manual GPU measurement of issue 8 on one GPU: save and load of the Llama-3.2-1B shape (bf16
# weights, fp32 main params and Adam moments), synchronous vs --async-save. Reports the time
# the step was blocked (save-checkpoint timer), the background write time, the iteration time
# around the saves, the size on disk and the load time; the resumed run's losses follow the
# uninterrupted one. Usage: bash tools/bench/checkpoint_bench.sh OUTDIR [CKPTDIR]
set -uo pipefail
out=${1:-/tmp/ckpt_bench}
ckpt=${2:-/tmp/ckpt_bench_ckpt}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
LLAMA_1B="--num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 32
  --group-query-attention --num-query-groups 8 --seq-length 2048 --max-position-embeddings 2048
  --position-embedding-type rope --rotary-base 500000 --use-rope-scaling --rope-scaling-factor 32
  --normalization RMSNorm --swiglu --disable-bias-linear --attention-dropout 0 --hidden-dropout 0
  --tokenizer-type NullTokenizer --vocab-size 128256 --micro-batch-size 4 --global-batch-size 4
  --lr 3e-4 --lr-warmup-iters 2 --lr-decay-iters 162 --bf16 --cross-entropy-loss-fusion --mock-data --log-interval 1
  --eval-iters 0 --seed 1234"
run() { name=$1; shift
  torchrun --standalone --nproc_per_node 1 pretrain_gpt.py $LLAMA_1B "$@" > "$out/$name.log" 2>&1
  echo "== $name (rc $?)"
  # iteration, ms, lm loss of the iterations around the saves (80 and 160)
  sed -n 's/.*iteration *\([0-9]*\)\/.*(ms): \([0-9.]*\).*lm loss: \([0-9.E+-]*\).*/\1 \2 \3/p' "$out/$name.log" \
    | awk '$1<=2 || ($1>=78 && $1<=84) || $1>=158 {printf "%s:%sms:%s  ", $1, $2, $3} END {print ""}'
  grep "copied .* to host memory" "$out/$name.log"
  grep -A1 "save-checkpoint\|load-checkpoint" "$out/$name.log" | grep "checkpoint \.\." | sed 's/^ */  /'
  grep "async checkpoint save of" "$out/$name.log"
  grep -m3 -i "error\|Traceback" "$out/$name.log"; }
size() { echo "  size of $1: $(du -sb "$1" | cut -f1) bytes, $(ls "$1" | wc -l) files"; }
rm -rf "$ckpt"
run sync --train-iters 160 --save "$ckpt/sync" --save-interval 80 --save-retain-interval 160
size "$ckpt/sync/iter_0000160"
rm -rf "$ckpt/sync"
run async --train-iters 160 --save "$ckpt/async" --save-interval 80 --save-retain-interval 160 --async-save
size "$ckpt/async/iter_0000160"
run load --train-iters 162 --load "$ckpt/async"
rm -rf "$ckpt"

#!/usr/bin/env bash
# Manual GPU check of issue 6 (2 GPUs, nccl, bf16): the same GPT run on 1 GPU and on 2 GPUs
# (DP=2) without overlap, with --overlap-grad-reduce, and with the distributed optimizer plus
# --overlap-param-gather. Prints the lm loss curves, the mean step time over iterations 6..N
# and the memory lines. Usage: bash tests/gpu/data_parallel_check.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/dp_check}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
FLAGS=${DP_CHECK_FLAGS:-"--num-layers 12 --hidden-size 1536 --num-attention-heads 12 --seq-length 2048
  --max-position-embeddings 2048 --tokenizer-type NullTokenizer --vocab-size 32000
  --micro-batch-size 2 --global-batch-size 16 --train-iters 30 --lr 3e-4 --lr-warmup-iters 5
  --lr-decay-style cosine --bf16 --attention-dropout 0 --hidden-dropout 0 --mock-data
  --log-interval 5 --seed 1234"}
run() { name=$1; n=$2; shift 2
  torchrun --standalone --nproc_per_node "$n" pretrain_gpt.py $FLAGS "$@" > "$out/$name.log" 2>&1
  echo "== $name (rc $?)"
  grep -o "iteration *[0-9]*/.*lm loss: [0-9.E+-]*" "$out/$name.log" | sed 's/ *|.*lm loss:/ lm loss:/' | paste -sd' '
  grep -o "elapsed time per iteration (ms): [0-9.]*" "$out/$name.log" | awk -F': ' 'NR>2 {s+=$2; n++}
    END {if (n) printf "mean step time over iterations 6-30 (ms): %.1f\n", s/n}'
  grep "memory (MB)" "$out/$name.log" | head -2
  grep -m3 -i "error\|Traceback" "$out/$name.log"; }
run dp1 1
run dp2 2
run dp2_overlap 2 --overlap-grad-reduce
run dp2_distopt_overlap 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather

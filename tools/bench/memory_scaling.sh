#!/usr/bin/env bash
# Issue 17 benchmark: Llama-3-8B shape, seq 2048, global batch 64, micro batch 1, bf16, mock data.
#   bash tools/bench/memory_scaling.sh 2gpu WORKDIR   # DP2 + distributed optimizer vs FSDP2 (ZeRO-3,
#                                                     # and without resharding after forward), 2 GPUs
#   bash tools/bench/memory_scaling.sh 1gpu WORKDIR   # one GPU, --optimizer-cpu-offload fraction 1.0
#   bash tools/bench/memory_scaling.sh tp2 WORKDIR    # TP2 + SP, eager and with CUDA graphs (issue 13);
#                                                     # ITERATIONS then `all` adds --tp-comm-overlap
#                                                     # graphed, `overlap` runs only that
#   bash tools/bench/memory_scaling.sh dp2 WORKDIR    # DP2 + distributed optimizer, the same two ways
# Prints per run: the memory estimate line, mean s/iteration over the steady iterations,
# tokens/s, TFLOP/s/GPU, the allocator's max allocated / max reserved (MB) per GPU, and for the
# one-GPU run the peak host memory in use. Logs stay in WORKDIR.
set -uo pipefail
mode=${1:?usage: memory_scaling.sh 2gpu|fsdp2-no-reshard|1gpu|tp2|dp2 WORKDIR [ITERATIONS [all|overlap]]}
out=${2:-/tmp/memory_scaling}
iters=${3:-8}  # the first two are warm-up, left out of the means
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
free -g | head -2

LLAMA3_8B="--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
  --group-query-attention --num-query-groups 8 --seq-length 2048 --max-position-embeddings 8192
  --tokenizer-type NullTokenizer --vocab-size 128256 --micro-batch-size 1 --global-batch-size 64
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2 --bf16 --mock-data
  --log-interval 1 --eval-iters 0 --seed 1234 --log-throughput --distributed-backend nccl"

run() { name=$1; n=$2; iters=$3; skip=$4; shift 4
  base=$(free -m | awk '/Mem:/ {print $3}')  # host memory in use before the run (other tenants)
  # Every 2 s: host memory in use, and the resident set of the training processes themselves
  # (pinned staging included), so the run's own share is told apart from the machine's.
  ( while sleep 2; do
      rss=$(ps -C python,python3,pt_main_thread -o rss= 2>/dev/null | awk '{s+=$1} END {print int(s/1024)}')
      echo "$(free -m | awk '/Mem:/ {print $3}') $rss"
      # Where host memory goes that RSS does not show (pinned/driver pages, kernel): MB.
      awk '/^(AnonPages|Mlocked|Unevictable|Shmem|PageTables|SUnreclaim|AnonHugePages):/ \
        {printf "%s %d ", $1, $2/1024} END {print ""}' /proc/meminfo >> "$out/$name.meminfo"; done ) \
    > "$out/$name.host_mb" &
  sampler=$!
  timeout ${RUN_TIMEOUT:-560} torchrun --standalone --nproc_per_node "$n" pretrain_llama.py $LLAMA3_8B --train-iters "$iters" \
    "$@" > "$out/$name.log" 2>&1
  rc=$?
  kill "$sampler" 2>/dev/null
  echo "== $name (rc $rc): $*"
  grep -m1 "memory estimate per GPU" "$out/$name.log"
  grep -o "elapsed time per iteration (ms): [0-9.]*" "$out/$name.log" | awk -F': ' -v skip="$skip" \
    'NR>skip {s+=$2; k++} END {if (k) printf "mean s/iteration over %d iterations: %.2f, tokens/s: %.0f\n", k, s/k/1000, 64*2048/(s/k/1000)}'
  grep -o "throughput per GPU (TFLOP/s/GPU): [0-9.]*" "$out/$name.log" | tail -1
  grep "memory (MB)" "$out/$name.log" | tail -"$n" | sed 's/.*memory (MB)/memory (MB)/'
  sort -n "$out/$name.host_mb" | tail -1 | awk -v base="$base" \
    '{printf "peak host memory in use (MB): %s (%s before the run)\n", $1, base}'
  sort -n -k2 "$out/$name.host_mb" | tail -1 | awk '{printf "peak RSS of the python processes (MB): %s\n", $2}'
  [ -s "$out/$name.meminfo" ] && echo "last /proc/meminfo sample (MB): $(tail -1 "$out/$name.meminfo")"
  grep -m3 "error\|Error\|Traceback" "$out/$name.log"; }

case "$mode" in
  2gpu)
    run dp2_distopt 2 "$iters" 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    run dp2_fsdp2 2 "$iters" 2 --use-torch-fsdp2 --no-gradient-accumulation-fusion
    [ "${4:-}" = "all" ] && run dp2_fsdp2_no_reshard 2 "$iters" 2 --use-torch-fsdp2 --no-gradient-accumulation-fusion \
      --torch-fsdp2-no-reshard-after-forward ;;
  fsdp2-no-reshard)  # the no-reshard FSDP2 run alone, then with bf16 gradient reduce-scatters
    run dp2_fsdp2_no_reshard 2 "$iters" 2 --use-torch-fsdp2 --no-gradient-accumulation-fusion \
      --torch-fsdp2-no-reshard-after-forward
    [ "${4:-}" = "all" ] && run dp2_fsdp2_no_reshard_bf16_rs 2 "$iters" 2 --use-torch-fsdp2 \
      --no-gradient-accumulation-fusion --torch-fsdp2-no-reshard-after-forward --grad-reduce-in-bf16 ;;
  1gpu)  # OFFLOAD_FRACTION: 1.0 unless set
    run gpu1_offload 1 "$iters" 2 --use-distributed-optimizer --optimizer-cpu-offload \
      --optimizer-offload-fraction "${OFFLOAD_FRACTION:-1.0}" --overlap-cpu-optimizer-d2h-h2d ;;
  tp2)  # issue 13: TP2 + SP against DP2's TFLOP/s, eagerly and with per-layer CUDA graphs;
        # 4th argument `all` adds --tp-comm-overlap under graphs, `overlap` runs that one alone
    if [ "${4:-}" != "overlap" ]; then
      run tp2_sp 2 "$iters" 2 --tensor-model-parallel-size 2 --sequence-parallel
      run tp2_sp_graphs 2 "$iters" 2 --tensor-model-parallel-size 2 --sequence-parallel \
        --cuda-graph-impl local --cuda-graph-warmup-steps 1
    fi
    case "${4:-}" in all|overlap) run tp2_sp_overlap_graphs 2 "$iters" 2 --tensor-model-parallel-size 2 \
      --sequence-parallel --tp-comm-overlap --cuda-graph-impl local --cuda-graph-warmup-steps 1 ;; esac ;;
  dp2)  # issue 13: the DP2 side of that comparison, eagerly and with per-layer CUDA graphs
    run dp2_distopt 2 "$iters" 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    run dp2_distopt_graphs 2 "$iters" 2 --use-distributed-optimizer --overlap-grad-reduce \
      --overlap-param-gather --cuda-graph-impl local --cuda-graph-warmup-steps 1 ;;
  *) echo "unknown mode $mode (2gpu, fsdp2-no-reshard, 1gpu, tp2 or dp2)"; exit 2 ;;
esac

#!/usr/bin/env bash
# Issue 13 benchmark: GPT 1.3B (24 layers, h 2048, 16 heads, ffn 8192), seq 2048, mbs 4, gbs 32,
# bf16, mock data, through pretrain_gpt.py, on one GPU and on two in each layout of the issue.
#   bash tools/bench/multi_gpu_layouts.sh WORKDIR [LAYOUTS...]   # default: all of them
# Layouts: 1gpu dp2 tp2 tp2_overlap pp2 pp2_vpp4 (and the cases below), and each with _graphs (per-layer CUDA
# graphs, --cuda-graph-impl local) or _prof (profiled, see that case). Prints per run the mean
# ms/iteration over the iterations after the first 4 (allocator and NCCL warm-up), TFLOP/s/GPU
# and max allocated, and for the pipeline layouts the traced bubble
# (tools/pipeline_trace_stats.py).
# Extra environment for every launch (e.g. NCCL_PROTO) is passed through as set by the caller.
set -uo pipefail
out=${1:-/tmp/multi_gpu_layouts}; shift || true
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=.
iters=${ITERS:-12}
GPT13="--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048
  --max-position-embeddings 2048 --tokenizer-type NullTokenizer --vocab-size 50304
  --micro-batch-size 4 --global-batch-size 32 --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine
  --lr-warmup-iters 2 --bf16 --mock-data --attention-dropout 0 --hidden-dropout 0
  --log-interval 1 --eval-iters 0 --seed 1234 --log-throughput --distributed-backend nccl
  --train-iters $iters"

run() { name=$1; n=$2; shift 2
  trace=(); [[ "$name" == pp* ]] && trace=(--pipeline-trace-file "$out/$name.trace.json")
  timeout "${RUN_TIMEOUT:-150}" torchrun --standalone --nproc_per_node "$n" pretrain_gpt.py $GPT13 "$@" \
    "${trace[@]}" > "$out/$name.log" 2>&1
  echo "== $name (rc $?, NCCL_PROTO=${NCCL_PROTO:-default}): $*"
  grep -o "elapsed time per iteration (ms): [0-9.]*" "$out/$name.log" | awk -F': ' \
    'NR>4 {s+=$2; k++} END {if (k) printf "mean ms/iteration over %d iterations: %.1f\n", k, s/k}'
  grep -o "throughput per GPU (TFLOP/s/GPU): [0-9.]*" "$out/$name.log" | tail -1
  grep "max allocated" "$out/$name.log" | tail -1 | sed 's/.*memory (MB)/memory (MB)/'
  # Pipeline layouts: the measured bubble next to the schedule's with these compute times.
  [ ${#trace[@]} -gt 0 ] && python tools/pipeline_trace_stats.py --skip-steps 4 "$out/$name.trace.json" | tail -2
  grep -m3 "error\|Error\|Traceback" "$out/$name.log"; }

layouts=("$@"); [ ${#layouts[@]} -eq 0 ] && layouts=(1gpu dp2 tp2 tp2_overlap pp2 pp2_vpp4)
for l in "${layouts[@]}"; do case $l in
  1gpu) run 1gpu 1 ;;
  dp2) run dp2 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather ;;
  # dp2 with the DP reduce-scatters/all-gathers held to DP_MAX_CTAS (8) thread blocks each
  dp2_ctas)
    printf 'dp:\n  max_ctas: %s\n' "${DP_MAX_CTAS:-8}" > "$out/nccl_dp.yaml"
    run dp2_ctas 2 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather \
      --nccl-communicator-config-path "$out/nccl_dp.yaml" ;;
  tp2) run tp2 2 --tensor-model-parallel-size 2 --sequence-parallel ;;
  tp2_overlap) run tp2_overlap 2 --tensor-model-parallel-size 2 --sequence-parallel --tp-comm-overlap ;;
  pp2) run pp2 2 --pipeline-model-parallel-size 2 ;;
  pp2_vpp4) run pp2_vpp4 2 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 3 ;;
  # PP2 VPP4 with 13 layers on rank 0 and 11 on rank 1, which also holds the output layer
  # (about 1.75 layers' work at vocabulary 50304), so both ranks get about the same work
  pp2_vpp4_bal) run pp2_vpp4_bal 2 --pipeline-model-parallel-size 2 \
    --pipeline-model-parallel-layout 'Et*4|t*3|t*3|t*3|t*3|t*3|t*3|t*2L' ;;
  pp2_vpp4_bal_graphs) run pp2_vpp4_bal_graphs 2 --pipeline-model-parallel-size 2 \
    --pipeline-model-parallel-layout 'Et*4|t*3|t*3|t*3|t*3|t*3|t*3|t*2L' --cuda-graph-impl local ;;
  # What tools/pipeline_layout_search.py found for this shape (README): the output layer alone
  # on the last stage; then the search again from this run's own trace
  pp2_vpp4_search) run pp2_vpp4_search 2 --pipeline-model-parallel-size 2 \
    --pipeline-model-parallel-layout 'Et*3|t*3|t*3|t*3|t*4|t*4|t*4|L'
    python tools/pipeline_layout_search.py "$out/pp2_vpp4_search.trace.json" --skip-steps 4 \
      --num-layers 24 --layout 'Et*3|t*3|t*3|t*3|t*4|t*4|t*4|L' --top 3 --try-group-sizes 4 8 ;;
  *_graphs) base=${l%_graphs}; flags=$(sed -n "s/^  $base) run $base \([0-9]\)\(.*\) ;;$/\1\2/p" "$0")
    [ -n "$flags" ] || { echo "unknown layout $l"; exit 2; }
    run "$l" $flags --cuda-graph-impl local ;;
  # A one-line layout, or one with _graphs, with _prof: the torch profiler over iterations 6-7,
  # then where each GPU's time went (tools/bench/trace_streams.py: NCCL exposed or hidden,
  # idle, by kernel class)
  *_prof) base=${l%_prof}; graphs=(); [[ $base == *_graphs ]] && graphs=(--cuda-graph-impl local)
    base=${base%_graphs}; flags=$(sed -n "s/^  $base) run $base \([0-9]\)\(.*\) ;;$/\1\2/p" "$0")
    [ -n "$flags" ] || { echo "unknown layout $l"; exit 2; }
    rm -rf "$out/$l.tb"
    run "$l" $flags "${graphs[@]}" --profile --use-pytorch-profiler --profile-step-start 6 --profile-step-end 7 \
      --tensorboard-dir "$out/$l.tb"
    python tools/bench/trace_streams.py $(find "$out/$l.tb" -name '*.pt.trace.json' | sort) ;;
  *) echo "unknown layout $l"; exit 2 ;;
esac; done

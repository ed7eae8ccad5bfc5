#!/usr/bin/env bash
# The main job in one command: install, then train a tiny Llama-style model with tensor
# parallelism over 2 processes (CPU + gloo without a GPU; one process per GPU with nccl when
# 2 GPUs are present) on deterministic mock data, printing Megatron's log lines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
NPROC=2
BACKEND=gloo
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge "$NPROC" ]; then
  BACKEND=nccl
fi
python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_llama.py \
  --tensor-model-parallel-size 2 --sequence-parallel \
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
  --group-query-attention --num-query-groups 2 \
  --seq-length 64 --max-position-embeddings 64 \
  --tokenizer-type NullTokenizer --vocab-size 512 --make-vocab-size-divisible-by 64 \
  --micro-batch-size 4 --global-batch-size 8 \
  --train-iters 30 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 3 \
  --mock-data --log-interval 5 --seed 1234 --distributed-backend "$BACKEND" "$@"

#!/usr/bin/env bash
# The main job in one command: install, build a real corpus that exists on every machine (the
# Python standard library's own source files), train a SentencePiece tokenizer on it, preprocess
# it into Megatron's .bin/.idx format, then train a tiny Llama-style model on it with tensor
# parallelism over 2 processes (CPU + gloo without a GPU; one process per GPU with nccl when 2
# GPUs are present), printing Megatron's log lines. Data steps are skipped when their output
# exists; set QUICKSTART_DATA to put the data elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
DATA=${QUICKSTART_DATA:-quickstart_out/data}
mkdir -p "$DATA"
if [ ! -f "$DATA/stdlib.jsonl" ]; then
  python tools/stdlib_to_jsonl.py --output "$DATA/stdlib.jsonl"
fi
if [ ! -f "$DATA/stdlib_spm.model" ]; then
  python tools/train_tokenizer.py --input "$DATA/stdlib.jsonl" --model-prefix "$DATA/stdlib_spm" \
    --vocab-size 4096
fi
if [ ! -f "$DATA/stdlib_text_document.idx" ]; then
  python tools/preprocess_data.py --input "$DATA/stdlib.jsonl" --output-prefix "$DATA/stdlib" \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$DATA/stdlib_spm.model" \
    --append-eod --workers 2 --log-interval 500
fi
NPROC=2
BACKEND=gloo
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge "$NPROC" ]; then
  BACKEND=nccl
fi
OUT=${QUICKSTART_OUT:-quickstart_out}
CKPT="$OUT/checkpoints"
TB="$OUT/tensorboard"
rm -rf "$CKPT" "$TB"  # every run of the quickstart starts from scratch
train() {
  python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_llama.py \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
    --group-query-attention --num-query-groups 2 \
    --seq-length 64 --max-position-embeddings 64 \
    --tokenizer-type Llama2Tokenizer --tokenizer-model "$DATA/stdlib_spm.model" \
    --make-vocab-size-divisible-by 64 \
    --data-path "$DATA/stdlib_text_document" --split 949,50,1 --data-cache-path "$DATA/cache" \
    --micro-batch-size 4 --global-batch-size 8 \
    --train-iters 40 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 3 \
    --eval-interval 10 --eval-iters 2 \
    --save "$CKPT" --load "$CKPT" --save-interval 10 \
    --tensorboard-dir "$TB" --log-interval 5 --seed 1234 --distributed-backend "$BACKEND" "$@"
}
echo "== part 1: train 20 of 40 iterations, checkpointing every 10, then stop"
train --exit-interval 20 "$@"
echo "== part 2: resume from the checkpoint of iteration $(cat "$CKPT/latest_checkpointed_iteration.txt") and finish"
train "$@"
echo
echo "Checkpoints: $CKPT (latest: iteration $(cat "$CKPT/latest_checkpointed_iteration.txt"))"
echo "View the training curves with:  tensorboard --logdir $TB"

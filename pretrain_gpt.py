"""Pretrain a GPT model (learned positions, LayerNorm, GeLU, tied embeddings).

    torchrun --nproc_per_node N pretrain_gpt.py --num-layers ... [Megatron-LM flags]
"""
import sys

from megatron_lite.training.pretrain import pretrain

# pretrain_gpt.py in Megatron-LM sets the tokenizer default (spec §10).
GPT_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}

if __name__ == "__main__":
    sys.exit(pretrain(defaults=GPT_DEFAULTS))

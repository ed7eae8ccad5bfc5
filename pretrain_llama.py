"""Pretrain a Llama-style model: the GPT entry point with Llama's defaults (RoPE, RMSNorm,
SwiGLU, no biases, untied output layer). Every default can still be overridden by a flag;
GQA is chosen with `--group-query-attention --num-query-groups G`.

    torchrun --nproc_per_node N pretrain_llama.py --num-layers ... [Megatron-LM flags]
"""
import sys

from megatron_lite.training.pretrain import pretrain

LLAMA_DEFAULTS = {
    "position_embedding_type": "rope",
    "normalization": "RMSNorm",
    "swiglu": True,
    "add_bias_linear": False,
    "untie_embeddings_and_output_weights": True,
    "rotary_base": 500000,
    "norm_epsilon": 1e-5,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}

if __name__ == "__main__":
    sys.exit(pretrain(defaults=LLAMA_DEFAULTS))

"""Install megatron_lite. CUDA sources in csrc/ are built on first use where nvcc exists,
never at install time, so `pip install -e .` works on CPU-only machines."""
from setuptools import find_packages, setup

setup(
    name="megatron_lite",
    version="0.1.0",
    description="Megatron-style pretraining of GPT and Llama models in a small code base",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy",
        "regex",
        "sentencepiece",
        "tiktoken",
        "tensorboard",
        "nltk",
        "zstandard",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "ruff", "transformers", "safetensors"],
        "apex": ["apex"],
        "te": ["transformer_engine"],
    },
)

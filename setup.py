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
        # triton: the CPU tests run the Triton kernels under its interpreter (Triton 3.6, as the
        # CUDA builds of torch 2.11 ship); its interpreter turns 1-element arrays into loop
        # bounds with int(), which numpy 2.4 refuses.
        "test": ["pytest", "ruff", "transformers", "safetensors",
                 "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
                 "numpy<2.4"],
        "apex": ["apex"],
        "te": ["transformer_engine"],
    },
)

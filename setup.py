"""megatron_lora: LoRA for Megatron-Core under tensor, sequence, data and pipeline parallelism."""

from setuptools import find_packages, setup

setup(
    name="megatron_lora",
    version="0.1.0",
    description="Exact, communication-free LoRA for NVIDIA Megatron-Core parallel models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_lora", "megatron_lora.*"]),
    python_requires=">=3.10",
    # torch is deliberately a range: pin the build you want (e.g. the CPU wheel) before installing.
    # megatron-core: the releases CI tests (0.13.0, 0.16.1, 0.19.2) and those between them.
    install_requires=["torch>=2.4", "megatron-core>=0.13.0,<0.20", "packaging", "safetensors>=0.4", "psutil",
                      "numpy"],
    extras_require={
        # Megatron-LM's training code (tests/distributed/test_megatron_lm_real.py) imports these beyond
        # megatron-core; core_v0.16's initialize.py imports triton (torch's CPU build has none).
        "test": ["pytest>=7", "pytest-timeout", "tensorboard", "six", "regex", "pyyaml", "pydantic", "psutil",
                 "triton==3.7.1"],  # torch 2.13.0's own triton (the CUDA build pins it)
        "tensorboard": ["tensorboard"],
        "hf": ["transformers>=4.45", "peft>=0.13", "safetensors>=0.4"],
        "te": ["transformer-engine[pytorch]"],
        "apex": [],  # apex is not on the package index: build it from source (see README)
    },
)

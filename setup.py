"""Install the `megatron_patch` package: LLaVA-OneVision-1.5 SFT on megatron-core.

torch is deliberately not listed: install `torch==2.13.0` first (see README), because a bare
`torch` requirement makes pip pull a multi-GB CUDA build on machines that only need the CPU one.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_patch",
    version="0.1.0",
    description="Megatron-core supervised fine-tuning pipeline for LLaVA-OneVision-1.5-class VLMs",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    install_requires=[
        "megatron-core==0.16.1",
        "megatron-energon>=7.4,<8",
        "webdataset>=0.2.86",
        "tensorboard>=2.14",
        "sentencepiece",
        "tokenizers>=0.19",
        "transformers>=4.51",
        "safetensors",
        "Pillow",
        "tqdm",
        "pyarrow",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "dev": ["pytest>=7", "pytest-timeout"],
    },
    entry_points={
        "console_scripts": [
            "llava-sft-convert=megatron_patch.data.convert_cli:main",
            "llava-sft-inspect=megatron_patch.data.inspect_cli:main",
            "llava-sft-demo-data=megatron_patch.data.demo_dataset:main",
            "llava-hf-to-mcore=megatron_patch.checkpoint_conversion.cli:hf_to_mcore_main",
            "llava-mcore-to-hf=megatron_patch.checkpoint_conversion.cli:mcore_to_hf_main",
            "llava-evaluate-vqa=megatron_patch.evaluation.vqa_cli:main",
        ],
    },
)

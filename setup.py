from setuptools import setup

setup(
    name="ddim-fused",
    version="0.1.0",
    description="DDIM sampler for PyTorch whose per-step update runs as one fused Triton kernel",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The GPU code lives in ddim_fused/kernels/: a top-level `kernels` folder would shadow
    # Hugging Face's `kernels` distribution (which transformers >= 5 imports) in a checkout.
    packages=["ddim_fused", "ddim_fused.cli", "ddim_fused.kernels", "ddim_fused.digits"],
    # The embedded digits model and its classifier (plain state dicts, weights_only-loadable);
    # the CPU kernels' C source, compiled on first use (ddim_fused/native.py).
    package_data={"ddim_fused.digits": ["weights/*.pt"], "ddim_fused": ["cpu_kernels.c"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.6; sys_platform == 'linux'",
        "Pillow",
        "tqdm",
    ],
    extras_require={
        # Everything the tests exercise, so none of them is skipped: the diffusers backend and
        # Stable Diffusion pipelines (transformers),
        # the digits classifier's check on real digits (scikit-learn, which brings scipy),
        # the property-based fuzz tests (hypothesis), the reader of generate's webdataset shards
        # (webdataset) and the quality plot (matplotlib).
        # k-diffusion itself cannot be listed: its release pins torchvision, wandb, kornia,
        # clip, ... and (through dctorch) numpy < 2, so the README's test command installs it
        # with --no-deps; torchsde and torchdiffeq are what its sampling module imports.
        # torchsde also lets diffusers build DPMSolverSDEScheduler, one of DDIM's compatibles.
        "test": ["pytest", "pytest-benchmark>=5.3", "diffusers>=0.42", "transformers>=4.40", "scikit-learn", "scipy",
                 "torchsde",
                 "torchdiffeq", "hypothesis>=6", "matplotlib", "webdataset",
                 "setuptools"],
        "diffusers": ["diffusers>=0.42"],
        # Stable Diffusion pipeline folders: the CLIP tokenizer and text encoder come from transformers.
        "sd": ["diffusers>=0.42", "transformers>=4.40"],
        "plots": ["matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "diffusers>=0.42"],
        "train": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["ddim-fused = ddim_fused.cli:main"]},
)

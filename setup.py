"""Install shear. The top-level ``kernels/`` folder installs as ``shear.kernels``.

Install torch first (``pip install torch==2.13.0``, or the CUDA build on a GPU machine),
then ``pip install --no-build-isolation -e ".[dev]"`` so that nothing pulls another torch.
"""

from setuptools import setup

setup(
    name="shear",
    version="0.1.0",
    description="Targeted structured pruning (Sheared LLaMA) of LLaMA-family models with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # ``kernels/`` must never install as a top-level ``kernels`` module: that name
    # belongs to Hugging Face's kernels package, which transformers probes.
    packages=["shear", "shear.ops", "shear.kernels"],
    package_dir={"shear": "shear", "shear.kernels": "kernels"},
    package_data={"shear": ["py.typed"]},
    install_requires=[
        "torch",
        "triton",
        "numpy",
        "transformers>=5",
        "datasets",
        "safetensors",
        "gguf",
        "accelerate",
        "tqdm",
        "matplotlib",
        "ninja",
    ],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ruff"]},
    entry_points={"console_scripts": ["shear=shear.cli:main"]},
)

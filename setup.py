"""nanogpt2 packaging. The top-level kernels/ folder installs as `nanogpt2.kernels`, never as a top-level
`kernels` package: PyPI has an unrelated `kernels` package that transformers probes for."""
from setuptools import setup

setup(
    name="nanogpt2",
    version="0.1.0",
    description="A readable GPT-2 in PyTorch: Hugging Face checkpoints in and out, Triton fused attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["nanogpt2", "nanogpt2.kernels"],
    package_dir={"nanogpt2": "nanogpt2", "nanogpt2.kernels": "kernels"},
    package_data={"nanogpt2": ["assets/gpt2-bpe/*", "assets/models/*/*", "assets/data/*"]},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",
        "tiktoken>=0.7",
        "numpy",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist", "transformers>=4.45", "hypothesis>=6", "peft>=0.13", "matplotlib"],
        "viz": ["matplotlib"],
    },
    entry_points={"console_scripts": ["nanogpt2=nanogpt2.__main__:main"]},
)

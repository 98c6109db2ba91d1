from setuptools import setup

# The Triton kernels live in `kernels/` and are imported as `lrdist.kernels` through the symlink
# lrdist/kernels -> ../kernels (a wheel gets a copy). A top-level `kernels` package would shadow
# Hugging Face's `kernels`, which transformers imports when it finds one, so `kernels/` has no
# __init__.py: with the repository root on sys.path it is at most a namespace package, which
# transformers ignores and which a real `kernels` install always wins over.
setup(
    name="lrdist",
    version="0.1.0",
    description="Per-region learning rates for continual fine-tuning, with a one-launch fused AdamW",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lrdist", "lrdist.methods", "lrdist.kernels"],
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.45",
        "datasets>=3.0",
        "optuna>=4.0",
        "pandas",
        "pyarrow",
        "matplotlib",
        "tqdm",
        "scipy",
        "peft>=0.13",
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4"], "hf": ["accelerate>=1.0"],
                    "postgres": ["psycopg[binary]>=3.1"]},  # --storage postgresql+psycopg://...
    entry_points={"console_scripts": ["lrdist=lrdist.cli:main"]},
)

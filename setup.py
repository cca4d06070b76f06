"""Install nlip-ds: the `nlip_ds` package and the `nlip-ds` command.

The fused contrastive-loss extension (kernels/) is added to `ext_modules` by the kernel build section below.
Install with `pip install --no-build-isolation -e .` so the extension builds against the torch already in the
environment (an isolated build would pull a second torch).
"""
import os

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

# `nlip-ds eval --linear-probe` and `--task caption` (a missing one is a one-line error: nlip_ds/optional.py)
EVAL_REQUIRES = [
    "scikit-learn>=1.4",
    "pycocoevalcap>=1.2",
]

# open_clip checks the open_clip export (tests/test_export_formats.py); training and exporting do not need it
TEST_REQUIRES = EVAL_REQUIRES + [
    "pytest>=8.0",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "pyarrow>=14",  # `nlip-ds audit` writes scores.parquet with it (JSONL without)
    "open_clip_torch>=3.0",
]

# ---- kernel build section (fused contrastive loss, kernels/) ----------------------------------------------
# nlip_ds._C_cpu always; nlip_ds._C_cuda too when torch is a CUDA build and CUDA_HOME has nvcc. Switches:
#   NLIP_DS_SKIP_EXT_BUILD=1   build no extension (the package compiles them just in time on first use)
#   NLIP_DS_SKIP_CUDA_BUILD=1  build the CPU extension only
#   TORCH_CUDA_ARCH_LIST       CUDA archs (default "8.0;9.0+PTX"); MAX_JOBS  parallel compile jobs (ninja)
# The build description lives in nlip_ds/ops/extension.py (shared with the just-in-time loader); it is loaded
# by path because the package is not importable before it is installed.


def _load_extension_spec():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "nlip_ds" / "ops" / "extension.py"
    spec = importlib.util.spec_from_file_location("_nlip_ds_extension_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_extensions():
    """(ext_modules, cmdclass) for setup(); empty when skipped or when torch is not importable."""
    if os.environ.get("NLIP_DS_SKIP_EXT_BUILD") == "1":
        print("nlip-ds: NLIP_DS_SKIP_EXT_BUILD=1, no extension built (compiled just in time on first use)")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("nlip-ds: torch is not importable (install with --no-build-isolation); no extension built")
        return [], {}
    spec = _load_extension_spec()
    extensions = [CppExtension(**spec.extension_kwargs("cpu"))]
    if os.environ.get("NLIP_DS_SKIP_CUDA_BUILD") == "1":
        print("nlip-ds: NLIP_DS_SKIP_CUDA_BUILD=1, CPU extension only")
    elif spec.cuda_toolkit() is None:
        print("nlip-ds: no CUDA toolkit (CUDA_HOME with bin/nvcc) or a CPU-only torch; CPU extension only")
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = spec.cuda_arch_list()
        print(f"nlip-ds: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        extensions.append(CUDAExtension(**spec.extension_kwargs("cuda")))
    return extensions, {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = get_extensions()
# ---- end of kernel build section --------------------------------------------------------------------------


setup(
    name="nlip-ds",
    version="0.1.0",
    description="Noise-robust language-image pre-training (NLIP) on DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=find_packages(include=["nlip_ds", "nlip_ds.*"]),
    package_data={"nlip_ds": ["resources/*"], "nlip_ds.completion": ["default_concepts.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"eval": EVAL_REQUIRES, "test": TEST_REQUIRES, "audit": ["pyarrow>=14"]},
    entry_points={"console_scripts": ["nlip-ds = nlip_ds.cli:entry"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)

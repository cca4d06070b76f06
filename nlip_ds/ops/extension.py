"""Build description and loader of the compiled fused-loss extensions (sources in kernels/).

Two modules: `nlip_ds._C_cpu` (always) and `nlip_ds._C_cuda` (when nvcc and a CUDA build of torch are present),
so a machine without CUDA still gets the CPU kernel. setup.py builds both from `extension_kwargs()`;
`load()` imports the built one or, when the package was installed without building it
(NLIP_DS_SKIP_EXT_BUILD=1), compiles it just in time with torch.utils.cpp_extension.load, cached in the
torch_extensions directory (TORCH_EXTENSIONS_DIR). This file imports nothing from nlip_ds, so that setup.py
can load it by path before the package is installed.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parents[2]
KERNEL_DIR = REPO_DIR / "kernels"
KINDS = ("cpu", "cuda")
# sm_80 (A100) and sm_90 (H100) binaries, plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# -fopenmp: at::parallel_for expands to OpenMP pragmas in our own translation unit; the library resolves to the
# libgomp torch already loaded (same soname), so there is one thread pool.
CXX_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_MACRO = "NLIP_DS_CUDA"

_modules: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def module_name(kind: str) -> str:
    return f"nlip_ds._C_{kind}"


def sources(kind: str) -> list[Path]:
    kernel = "contrastive_cpu.cpp" if kind == "cpu" else "contrastive_cuda.cu"
    return [KERNEL_DIR / "binding.cpp", KERNEL_DIR / kernel]


def _is_toolkit(root) -> bool:
    return root is not None and Path(root, "bin", "nvcc").exists() and Path(root, "include", "cuda_runtime.h").exists()


def cuda_toolkit() -> str | None:
    """The CUDA toolkit root to compile with, or None when torch has no CUDA or no root has nvcc and headers.

    torch guesses the root from `which nvcc`, which a wrapper script in /usr/local/bin turns into /usr/local;
    when its guess is not a toolkit but another candidate is, cpp_extension is pointed at that one.
    """
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return None
    if _is_toolkit(cpp_extension.CUDA_HOME):
        return cpp_extension.CUDA_HOME
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if _is_toolkit(root):
            logger.info("using the CUDA toolkit at %s (torch guessed %s)", root, cpp_extension.CUDA_HOME)
            cpp_extension.CUDA_HOME = root
            return root
    return None


def cuda_arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def extension_kwargs(kind: str, root: Path = REPO_DIR) -> dict:
    """Keyword arguments of CppExtension / CUDAExtension for setup.py (sources relative to `root`)."""
    kwargs = {
        "name": module_name(kind),
        "sources": [os.path.relpath(p, root) for p in sources(kind)],
        "include_dirs": [str(KERNEL_DIR)],
        "extra_compile_args": {"cxx": list(CXX_FLAGS)},
        "extra_link_args": list(LINK_FLAGS),
    }
    if kind == "cuda":
        kwargs["define_macros"] = [(CUDA_MACRO, None)]
        kwargs["extra_compile_args"]["nvcc"] = list(NVCC_FLAGS)
    return kwargs


def jit_build(kind: str, build_directory: str | None = None, verbose: bool = False) -> ModuleType:
    """Compile (or reuse the cached build of) one extension with torch.utils.cpp_extension.load."""
    from torch.utils import cpp_extension

    extra = {}
    if kind == "cuda":
        if cuda_toolkit() is None:
            raise RuntimeError("no CUDA toolkit (set CUDA_HOME to a directory with bin/nvcc) or a CPU-only torch")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        extra = {"extra_cuda_cflags": NVCC_FLAGS + [f"-D{CUDA_MACRO}"], "with_cuda": True}
    macro = [f"-D{CUDA_MACRO}"] if kind == "cuda" else []
    return cpp_extension.load(
        name=f"nlip_ds_C_{kind}", sources=[str(p) for p in sources(kind)], extra_cflags=CXX_FLAGS + macro,
        extra_ldflags=LINK_FLAGS, extra_include_paths=[str(KERNEL_DIR)], build_directory=build_directory,
        verbose=verbose, **extra)


def _import_prebuilt(kind: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name(kind))
    except ImportError as err:  # not built, or built against another torch (undefined symbols)
        logger.debug("%s not importable (%s)", module_name(kind), err)
        return None


def _jit(kind: str) -> ModuleType:
    if not all(p.exists() for p in sources(kind)):
        raise RuntimeError(f"{module_name(kind)} is not built and the kernel sources are not at {KERNEL_DIR}")
    logger.warning("%s was not built with the package; building it just in time (the first build takes about "
                   "a minute and is cached in the torch_extensions directory)", module_name(kind))
    start = time.perf_counter()
    module = jit_build(kind)
    logger.info("%s ready after %.0f s", module_name(kind), time.perf_counter() - start)
    return module


def load(kind: str) -> ModuleType | None:
    """The compiled module for `kind` ("cpu" or "cuda"), or None (then `load_error(kind)` says why)."""
    if kind not in KINDS:
        raise ValueError(f"no fused-loss extension for device type {kind!r}; have {KINDS}")
    if kind not in _modules:
        module = _import_prebuilt(kind)
        if module is None:
            try:
                module = _jit(kind)
            except Exception as err:  # a failed compile must degrade to the reference, not crash training
                _errors[kind] = f"{module_name(kind)} unavailable: {type(err).__name__}: {err}"
        _modules[kind] = module
    return _modules[kind]


def load_error(kind: str) -> str | None:
    return _errors.get(kind)

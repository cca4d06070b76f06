"""Packages that only some commands need: the `eval` extra (`pip install 'nlip-ds[eval]'`). A missing one is
one line that names the package, what needs it and the pip command, raised before the work starts."""
from __future__ import annotations

import importlib.util

# import name -> (package on the registry, nlip-ds extra that installs it)
OPTIONAL = {"sklearn": ("scikit-learn", "eval"), "pycocoevalcap": ("pycocoevalcap", "eval")}


class MissingPackage(ImportError, ValueError):
    """An optional package is not installed. A ValueError too, so that commands which report bad input in one
    line (`nlip-ds eval`) report this the same way."""


def require(module: str, purpose: str) -> None:
    """Raise MissingPackage unless `module` (a key of OPTIONAL) can be imported."""
    if importlib.util.find_spec(module) is None:
        package, extra = OPTIONAL[module]
        raise MissingPackage(f"{purpose} needs the package {package}, which is not installed: "
                             f"pip install {package}  (or pip install 'nlip-ds[{extra}]')")

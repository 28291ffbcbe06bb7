"""The optional packages a benchmark script needs, checked before it runs (a quality run takes
minutes; it must not fail at its first plot and lose what it computed)."""
from __future__ import annotations

import importlib.util
import sys

# import name -> pip name
_PIP = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "diffusers": "diffusers"}


def _missing(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked (None)
        return sys.modules[module] is None
    return importlib.util.find_spec(module) is None


def require(script: str, *modules: str) -> None:
    """Exit with status 2 and one line naming what is missing and how to install it."""
    missing = [m for m in modules if _missing(m)]
    if missing:
        names = ", ".join(_PIP.get(m, m) for m in missing)
        print(f"{script} needs {names} (the 'bench' extra): pip install \".[bench]\" in the fastdiff source tree, "
              "or pip install " + " ".join(_PIP.get(m, m) for m in missing), file=sys.stderr)
        sys.exit(2)

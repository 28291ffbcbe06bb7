"""Loads the compiled schedule module fastdiff._C, failing once with how to build it."""
from __future__ import annotations

try:
    import fastdiff._C as C  # the compiled module (a file of this package, not the package itself)
except ImportError as exc:  # pragma: no cover - only on a broken or unbuilt install
    raise ImportError(
        "fastdiff's compiled module fastdiff._C is missing or does not load "
        f"({exc}). It is built from csrc/ by pip: run `pip install -e .` (or "
        "`pip install --no-build-isolation -e .` where setuptools and pybind11 are installed) "
        "in the fastdiff source tree. A C++17 compiler is needed; PyTorch headers are not."
    ) from exc

__all__ = ["C"]

"""Which path runs an op: the fused Triton kernel, the fused C++ CPU step, or the plain-torch
reference.

``FASTDIFF_BACKEND=torch|triton|cpp`` forces a path for the whole process; an explicit
``backend=`` argument forces it for one call. Otherwise CUDA tensors take Triton (when it
imports), CPU tensors the fused C++ step ("cpp", csrc/cpu_step.cpp), and everything else (MPS,
...) the plain-torch reference. Under ``TRITON_INTERPRET=1`` the Triton kernels
also run on CPU tensors, which is how the test suite exercises them without a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cpp")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(available, reason) for the Triton path; imported lazily, never at package import."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"triton does not import: {type(exc).__name__}: {exc}"
    return True, f"triton {triton.__version__}"


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1). Read once: triton
    itself reads it once, at its first import, and the lookup was ~1 us of every launch."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: Optional[str], device: torch.device) -> str:
    """Pick the backend for tensors on ``device``; raise a clear error if it cannot run there."""
    choice = backend or os.environ.get("FASTDIFF_BACKEND") or None
    if choice is not None:
        choice = choice.lower()
        if choice not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r} "
                             "(from the backend= argument or FASTDIFF_BACKEND)")
        if choice == "cpp":
            if device.type != "cpu":
                raise RuntimeError(f"the cpp backend (fastdiff's fused C++ CPU step) runs CPU tensors, got device "
                                   f"{device}; use backend='triton' on CUDA or leave the backend unset")
            from .._ext import C
            if not hasattr(C, "cpu_step"):
                raise RuntimeError("the cpp backend was asked for but fastdiff._C has no cpu_step: rebuild the "
                                   "extension from this source tree (pip install -e .)")
        if choice == "triton":
            ok, why = triton_status()
            if not ok:
                raise RuntimeError(f"the triton backend was asked for but {why}")
            if device.type != "cuda" and not interpreting():
                raise RuntimeError(
                    f"the triton backend needs CUDA tensors (got device {device}); set "
                    "TRITON_INTERPRET=1 before triton is first imported to run the kernels on the CPU "
                    "through Triton's interpreter, or use backend='torch'")
        return choice
    if device.type == "cuda" and triton_status()[0]:
        return "triton"
    if device.type == "cpu" and _cpp_available():
        return "cpp"
    return "torch"


@functools.lru_cache(maxsize=None)
def _cpp_available() -> bool:
    """Whether fastdiff._C has the fused C++ CPU step (it has, once built from this tree)."""
    from .._ext import C
    return hasattr(C, "cpu_step")


def canonical_device(device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: the key a tensor's own ``.device`` will have, so caches
    keyed by device hit whichever spelling the caller used."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device

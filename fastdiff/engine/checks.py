"""The checks every public entry point makes of the numbers it is given, in one place, so that the
messages name the constraint in one wording:

    check_int("steps", steps, 1, 1000)        -> "steps must be an int in [1, 1000], got 2.5"
    check_real("eta", eta, 0)                 -> "eta must be a finite number >= 0, got nan"
    check_int_array("timesteps", [5.7, 3.2])  -> "timesteps must hold integers, got timesteps[0] = 5.7"
    check_device("cuda")                      -> "device 'cuda' was asked for but this torch build has no CUDA ..."

Numbers may come as Python numbers, numpy scalars or 0-d tensors (a 0-d CUDA tensor is read with
one sync: these checks run where arguments are taken, never inside a sampling loop). Booleans,
strings and complex numbers are refused rather than converted, and so is a float where an int
is meant: 2.5 is not silently 2.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import numpy as np
import torch


def _bound(v) -> str:
    """A bound as people write it: 2**62 rather than 4611686018427387904."""
    if isinstance(v, int) and v >= 2**16 and (v & (v - 1)) == 0:
        return f"2**{v.bit_length() - 1}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {_bound(lo)}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {_bound(hi)}"
    return ""


def _scalar(v):
    """A 0-d tensor as a Python number (bool and complex kept as such, for the caller to refuse)."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.dim() == 0 else v
    return v


def check_int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None, *, hi_open: bool = False) -> int:
    """``v`` as a Python int, if it is an integer (int, numpy integer, 0-d integer tensor; not a bool
    and not a float, even an integral one) in [lo, hi] (``hi_open``: [lo, hi)); else ValueError."""
    s = _scalar(v)
    ok = not isinstance(s, (bool, np.bool_)) and hasattr(s, "__index__") and not isinstance(s, torch.Tensor)
    if ok:
        i = operator.index(s)
        if (lo is None or i >= lo) and (hi is None or (i < hi if hi_open else i <= hi)):
            return i
    raise ValueError(f"{name} must be an int{_range_text(lo, hi, hi_open=hi_open)}, got {v!r}")


def check_real(name: str, v, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
               hi_open: bool = False, allow_inf: bool = False) -> float:
    """``v`` as a Python float, if it is a real number (int, float, numpy scalar, 0-d real tensor;
    not a bool, a string or a complex number), not NaN, finite unless ``allow_inf``, within the
    bounds (``lo_open`` / ``hi_open`` exclude them); else ValueError."""
    s = _scalar(v)
    ok = isinstance(s, numbers.Real) and not isinstance(s, (bool, np.bool_))
    if ok:
        f = float(s)
        ok = not math.isnan(f) and (allow_inf or math.isfinite(f))
        if ok and lo is not None:
            ok = f > lo if lo_open else f >= lo
        if ok and hi is not None:
            ok = f < hi if hi_open else f <= hi
        if ok:
            return f
    kind = "a number" if allow_inf else "a finite number"
    raise ValueError(f"{name} must be {kind}{_range_text(lo, hi, lo_open, hi_open)}, got {v!r}")


def check_int_array(name: str, values) -> np.ndarray:
    """``values`` (a sequence, array or tensor of integers, or of floats that are whole numbers) as
    a one-dimensional int64 array; floats such as 5.7 are refused, never truncated."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a one-dimensional sequence of integers, got {values!r}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional sequence of integers, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2**63:
            raise ValueError(f"{name} must hold integers below 2**63, got {int(arr.max())}")
        return arr.astype(np.int64)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind != "f":
        raise ValueError(f"{name} must hold integers, got an array of {arr.dtype}")
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) >= 2.0**63)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must hold integers, got {name}[{i}] = {arr[i].item()!r}")
    return arr.astype(np.int64)


def check_device(device) -> torch.device:
    """``device`` as a torch.device (None: the CPU), refusing in one line a device torch cannot use
    here (a CUDA device without CUDA) rather than failing at the first allocation."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ValueError(f"device {str(device)!r} was asked for but {why} (torch {torch.__version__}); "
                         "use device='cpu'")
    return device

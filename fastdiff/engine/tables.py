"""A coefficient table: the float64 rows C++ built for one solver configuration, where its rows
come from, and its device copies.

Rows are either one per sampling step (``rows="step"``: the native samplers, indexed by a
device step counter) or one per training timestep (``rows="timestep"``: the diffusers drop-ins,
whose step is called with a timestep, so the timestep itself is the row index and a timestep
tensor on the GPU indexes the table with no host sync).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from .._ext import C
from .backend import canonical_device, resolve

COLUMNS = C.COLUMNS
NCOL = C.NCOL
ROWS = ("step", "timestep")

# Device copies kept per table: (device, dtype) pairs, least recently used dropped first.
_MAX_COPIES = 4

# A float32 step divides by a_t (epsilon predictions) or b_t (sample predictions): below this the
# quotient of an O(1) numerator overflows float32 (max 3.4e38) with eight orders of margin, and
# below float32's smallest normal (1.2e-38) the divisor itself rounds to 0 or loses its digits.
FLOAT32_DIVISOR_MIN = 1e-30
_DIVISORS = ("a_t", "b_t")


class Table:
    """``host``: [rows, NCOL] float64 (read-only). ``on(device, dtype)`` gives the device copy
    (made once, cached); ``backend(device)`` the path a step on that device takes."""

    __slots__ = ("host", "rows", "backend_choice", "used", "tiny_divisors", "_copies", "_resolved", "_key")

    def __init__(self, host, *, rows: str = "step", backend: Optional[str] = None):
        if isinstance(host, torch.Tensor):
            host = host.detach().cpu().double().numpy()
        host = np.array(host, dtype=np.float64, copy=True)
        if host.ndim != 2 or host.shape[1] != NCOL or host.shape[0] < 1:
            raise ValueError(f"a coefficient table must be [rows >= 1, {NCOL}], got shape {host.shape}")
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
        host.setflags(write=False)
        self.host = host
        # The columns that are non-zero in some row: the step skips the terms of the others.
        self.used = frozenset(name for j, name in enumerate(COLUMNS) if np.any(host[:, j] != 0.0))
        # Divisor columns with a value that is positive but too small for float32 arithmetic:
        # name -> (first such row, its value); the step refuses a float32 call that would divide by it.
        self.tiny_divisors = {}
        for name in _DIVISORS:
            col = np.abs(host[:, COLUMNS.index(name)])
            bad = (col > 0) & (col < FLOAT32_DIVISOR_MIN)
            if bad.any():
                r = int(np.argmax(bad))
                self.tiny_divisors[name] = (r, float(host[r, COLUMNS.index(name)]))
        self.rows = rows
        self.backend_choice = backend
        self._copies: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._resolved: dict = {}
        self._key: Optional[str] = None

    def __len__(self) -> int:
        return self.host.shape[0]

    def column(self, name: str) -> np.ndarray:
        return self.host[:, COLUMNS.index(name)]

    @property
    def key(self) -> str:
        """A digest of the values: equal keys, equal tables (graph caches key on it)."""
        if self._key is None:
            self._key = hashlib.sha1(self.host.tobytes()).hexdigest()
        return self._key

    def on(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The table on ``device`` in ``dtype`` (float32 for the kernels, float64 for float64
        samples), contiguous; uploaded once."""
        device = canonical_device(device)
        k = (device, dtype)
        t = self._copies.get(k)
        if t is not None:
            self._copies.move_to_end(k)
            return t
        host = torch.from_numpy(self.host.copy()).to(dtype)
        if device.type == "cuda":
            # Pinned memory and non_blocking: an upload at the first step of a loop does not
            # wait for the GPU.
            t = host.pin_memory().to(device, non_blocking=True)
        else:
            t = host.to(device)
        self._copies[k] = t
        while len(self._copies) > _MAX_COPIES:
            self._copies.popitem(last=False)
        return t

    def backend(self, device: torch.device, override: Optional[str] = None) -> str:
        """"triton" or "torch" for a step on ``device``; resolved once per device (the
        FASTDIFF_BACKEND lookup was 6% of a small CPU step)."""
        choice = override if override is not None else self.backend_choice
        k = (choice, device)
        r = self._resolved.get(k)
        if r is None:
            r = self._resolved[k] = resolve(choice, device)
        return r

    def __repr__(self) -> str:
        return f"Table({len(self)} rows per {self.rows}, backend={self.backend_choice!r})"

"""Where a local tensor lies in a full latent, as far as the noise is concerned.

The noise of element g of a latent is a function of (seed, g, step) (invariant 3 of
docs/design.md), so a process that holds part of a latent draws exactly that part of the full
latent's noise once it knows the global index of each of its elements. ``Shard`` describes the
two layouts that sharding produces and turns them into the step's ``index_offset`` and
``index_run``:

* a slice along one dimension (``dim``): samples of a batch (dim 0, data parallelism), tokens of
  a sequence (sequence / context parallelism), rows of an image (patch parallelism). In the
  row-major full tensor such a slice is ``outer`` runs of ``length * inner`` consecutive
  indices, ``full_shape[dim] * inner`` apart, where ``inner`` is the product of the sizes after
  ``dim``;
* a contiguous range of the flattened latent (``dim=None``): one run.

Shards along one dimension are what the step supports; a tile cut along two dimensions at once
is not one of them (it would need a second level of runs).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


def _int(name, v, lo=0) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__") or operator.index(v) < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return operator.index(v)


@dataclass(frozen=True)
class Shard:
    """``length`` entries from ``start`` along ``dim`` of a row-major tensor of ``full_shape``
    (``dim=None``: the flattened elements start .. start + length - 1, held as a 1-D tensor).
    ``sample_offset`` is the global index of the full tensor's first sample, for a full batch
    that is itself one part of a larger one.

    ``Shard.split(full_shape, dim, parts, index)`` gives part ``index`` of ``parts`` near-equal
    parts (the first ``size % parts`` one longer), the rule ``fastdiff.distributed`` uses.
    """

    full_shape: Tuple[int, ...]
    dim: Optional[int]
    start: int
    length: int
    sample_offset: int = 0

    def __post_init__(self):
        shape = tuple(_int("full_shape entries", s, 1) for s in self.full_shape) if isinstance(
            self.full_shape, (tuple, list, torch.Size)) else None
        if not shape:
            raise ValueError(f"full_shape must be a non-empty tuple of positive sizes, got {self.full_shape!r}")
        object.__setattr__(self, "full_shape", shape)
        dim = self.dim
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
                raise ValueError(f"dim must be None (a flattened range) or a dimension of full_shape {shape}, "
                                 f"got {dim!r}")
            object.__setattr__(self, "dim", dim % len(shape))
        size = math.prod(shape) if self.dim is None else shape[self.dim]
        start, length = _int("start", self.start), _int("length", self.length)
        if start + length > size:
            where = "the flattened tensor" if self.dim is None else f"dim {self.dim}"
            raise ValueError(f"a shard of {where} (size {size}) must lie inside it, got start={start}, "
                             f"length={length}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "sample_offset", _int("sample_offset", self.sample_offset))

    @classmethod
    def split(cls, full_shape, dim: Optional[int], parts: int, index: int, sample_offset: int = 0) -> "Shard":
        """Part ``index`` of ``parts``: sizes differ by at most one, the longer parts first, in order
        (so the parts concatenated in index order are the full tensor)."""
        parts, index = _int("parts", parts, 1), _int("index", index)
        if index >= parts:
            raise ValueError(f"index must lie in [0, parts={parts}), got {index}")
        probe = cls(full_shape, dim, 0, 0)
        size = math.prod(probe.full_shape) if probe.dim is None else probe.full_shape[probe.dim]
        base, extra = divmod(size, parts)
        return cls(probe.full_shape, probe.dim, index * base + min(index, extra), base + (index < extra),
                   sample_offset)

    # -- the layout ---------------------------------------------------------------------------
    @property
    def local_shape(self) -> Tuple[int, ...]:
        if self.dim is None:
            return (self.length,)
        return self.full_shape[:self.dim] + (self.length,) + self.full_shape[self.dim + 1:]

    @property
    def numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def whole_samples(self) -> bool:
        """Whether the shard holds whole samples only (what a per-sample statistic such as dynamic
        thresholding's quantile needs)."""
        if self.dim is None:
            per_sample = math.prod(self.full_shape[1:])
            return self.start % per_sample == 0 and self.length % per_sample == 0
        return self.dim == 0 or self.length == self.full_shape[self.dim]

    @property
    def index_offset(self) -> int:
        """The global element index of the shard's first element."""
        base = self.sample_offset * math.prod(self.full_shape[1:])
        if self.dim is None:
            return base + self.start
        return base + self.start * math.prod(self.full_shape[self.dim + 1:])

    @property
    def index_run(self) -> Optional[Tuple[int, int]]:
        """(length, stride) of the runs of consecutive global indices, or None for one run."""
        if self.dim is None:
            return None
        inner = math.prod(self.full_shape[self.dim + 1:])
        if self.dim == 0 or self.length == self.full_shape[self.dim] or self.length == 0:
            return None
        return (self.length * inner, self.full_shape[self.dim] * inner)

    @property
    def noise_index(self) -> dict:
        """Keywords for ``fastdiff.step`` and ``philox.randn``: index_offset and index_run."""
        return {"index_offset": self.index_offset, "index_run": self.index_run}

    # -- tensors ----------------------------------------------------------------------------------
    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of a full tensor (a view where the layout allows)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"the full tensor must have shape {self.full_shape}, got {tuple(full.shape)}")
        if self.dim is None:
            return full.reshape(-1)[self.start:self.start + self.length]
        return full.narrow(self.dim, self.start, self.length)

    def check_local(self, name: str, t: torch.Tensor) -> None:
        """Raise unless ``t`` has this shard's size (its shape, or for a flattened range its count)."""
        ok = t.numel() == self.length if self.dim is None else tuple(t.shape) == self.local_shape
        if not ok:
            want = f"{self.length} elements" if self.dim is None else f"shape {self.local_shape}"
            raise ValueError(f"{name} must be this shard of {self.full_shape} ({want}), got shape {tuple(t.shape)}")

"""Sampler names: ``@register_sampler`` makes a Sampler class available to
``fastdiff.sample(sampler=cls.name)``; ``make_sampler`` builds one by name."""
from __future__ import annotations

from typing import Dict, Optional

from .base import Sampler

SAMPLERS: Dict[str, type] = {}


def register_sampler(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.name``. Returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise TypeError(f"register_sampler decorates a Sampler subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    SAMPLERS[name] = cls
    return cls


def make_sampler(sampler="ddim", schedule=None, steps: Optional[int] = 50, **kw) -> Sampler:
    """A sampler from a name (``SAMPLERS``) and its options; a Sampler object is returned as is
    (then no options may be given)."""
    if isinstance(sampler, Sampler):
        if kw or schedule is not None:
            raise TypeError(f"sampler options {sorted(kw) + (['schedule'] if schedule is not None else [])} "
                            "need a sampler name, not a Sampler object")
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler](schedule, steps, **kw)

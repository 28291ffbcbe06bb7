"""``fastdiff.sample``: one call from a model to samples, eager or as one CUDA graph. It sits
above the samplers and the graph runner, so that neither imports the other."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .engine.shard import Shard
from .graphs import sample_graphed
from .samplers.registry import make_sampler


def sample(model, shape: Optional[Sequence[int]] = None, *, sampler="ddim", steps: Optional[int] = 50,
           seed: int = 0, schedule=None, x: Optional[torch.Tensor] = None, sample_offset: int = 0,
           shard: Optional[Shard] = None, device=None, dtype: torch.dtype = torch.float32, progress: bool = False,
           callback: Optional[Callable] = None, cuda_graph: bool = False, **sampler_kwargs) -> torch.Tensor:
    """Sample from ``model`` in one call, e.g.
    ``fastdiff.sample(model, (4, 3, 32, 32), sampler="ddim", steps=50, eta=0.0, seed=0)``.
    ``sampler`` is a name (``fastdiff.SAMPLERS``) or a Sampler object; keyword arguments beyond
    the loop's go to the sampler (eta, prediction_type, timestep_spacing, clip_sample,
    variance_type, ...). ``cuda_graph=True`` replays the loop as one CUDA graph, captured once
    per (model, sampler configuration, shape, dtype, device); on a non-CUDA device it runs
    eagerly with one warning. ``shard`` (a ``fastdiff.engine.shard.Shard``): sample that part of
    a larger latent, with exactly its part of the noise (``fastdiff.distributed`` uses it)."""
    if isinstance(sampler, str):
        s = make_sampler(sampler, schedule, steps, **sampler_kwargs)
    else:
        s = make_sampler(sampler, schedule, **sampler_kwargs)
    if cuda_graph:
        return sample_graphed(s, model, shape, x=x, seed=seed, sample_offset=sample_offset, shard=shard,
                              device=device, dtype=dtype, progress=progress, callback=callback)
    return s.sample(model, shape, x=x, seed=seed, sample_offset=sample_offset, shard=shard, device=device,
                    dtype=dtype, progress=progress, callback=callback)

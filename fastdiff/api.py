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

    ``model(x_t, t) -> output``: ``t`` is a [batch] tensor of timesteps (int64 on the VP path,
    float32 sigma * 1000 on the flow path); ``output`` has x_t's shape and is read as
    ``prediction_type``.

    ``sampler``: a name or a Sampler object. The built-in names (``fastdiff.SAMPLERS``):

    * "ddim" (eta), "ddpm" (variance_type "fixed_small" / "fixed_large"), "consistency" on a VP
      ``schedule`` (a ``fastdiff.Schedule``, a beta-schedule name such as "scaled_linear", a dict
      of Schedule keywords, or None for linear over 1000 timesteps);
    * "ocm-ddpm", "ocm-ddim": covariance-aware DDPM / DDIM (``head=`` the covariance head, or a
      model returning (output, h));
    * "dpmpp-2m", "dpmpp-2m-sde": DPM-Solver++ (``solver_order``, ``solver_type``,
      ``use_karras_sigmas``, ...) and "euler", "euler-a" (sigma space: x_T is scaled by sigma_max,
      the model sees x / sqrt(sigma^2 + 1)) and "unipc" (UniPC predictor-corrector:
      ``solver_order`` 1-3, ``solver_type`` "bh1" / "bh2", ``disable_corrector``, ``predict_x0``)
      on a VP ``schedule``;
    * "flow-euler", "flow-stochastic", "flow-ddim" (eta), "ocm-flow", "flow-dpmpp-2m", "flow-dpmpp-2m-sde" on a
      rectified-flow ``schedule`` (a ``fastdiff.FlowSchedule`` or a dict; ``mu`` /
      ``image_seq_len`` with dynamic shifting; ``sigmas=[...]`` with ``steps=None``), and
      "flow-unipc" (UniPC on diffusers' UniPC flow sigmas, as Wan: ``schedule=dict(shift=5.0)``).

    The loop's keywords:

    * ``shape`` (batch first; x_T is drawn from ``seed``) or ``x`` (x_T itself);
    * ``steps``: sampling steps (or ``timesteps=[...]``, a strictly descending list);
    * ``seed``: an int in [0, 2**63); ``sample_offset``: the global index of this batch's first
      sample, so that a batch drawn in pieces equals the batch drawn at once;
    * ``device`` (default CPU), ``dtype`` (float32, float16, bfloat16);
    * ``progress``: a tqdm bar; ``callback(i, t, x)`` after each step;
    * ``cuda_graph=True`` replays the loop as one CUDA graph, captured once per (model, sampler
      configuration, shape, dtype, device); on a non-CUDA device it runs eagerly with one warning;
    * ``shard`` (a ``fastdiff.engine.shard.Shard``): sample that part of a larger latent, with
      exactly its part of the noise (``fastdiff.distributed`` uses it).
    * ``guidance_scale=7.5`` (and ``guidance_rescale``, phi in [0, 1], Lin et al. 2023): classifier-free
      guidance in the fused step. The model is then called on the doubled batch [x_t; x_t] with
      [2 batch] timesteps and must return [2 batch, ...], the unconditional outputs first (as
      diffusers' ``noise_pred.chunk(2)``); the step uses u + w (c - u). w lives in a device
      tensor: with ``cuda_graph=True`` a new scale replays the same graph.

    Other keywords go to the sampler: ``prediction_type`` ("epsilon", "v_prediction", "sample";
    "flow_prediction" on the flow path), ``eta``, ``timestep_spacing`` ("leading", "trailing",
    "linspace") and ``steps_offset``, ``clip_sample`` / ``clip_sample_range``, ``thresholding``
    (``dynamic_thresholding_ratio``, ``sample_max_value``), ``use_clipped_model_output``,
    ``variance_type``, ``head`` / ``cov_max`` / ``clip_pixels`` (OCM), ``backend`` ("triton" or
    "torch"). Bad values raise ValueError (or TypeError) naming the constraint.
    """
    if isinstance(sampler, str):
        s = make_sampler(sampler, schedule, steps, **sampler_kwargs)
    else:
        s = make_sampler(sampler, schedule, **sampler_kwargs)
    if cuda_graph:
        return sample_graphed(s, model, shape, x=x, seed=seed, sample_offset=sample_offset, shard=shard,
                              device=device, dtype=dtype, progress=progress, callback=callback)
    return s.sample(model, shape, x=x, seed=seed, sample_offset=sample_offset, shard=shard, device=device,
                    dtype=dtype, progress=progress, callback=callback)

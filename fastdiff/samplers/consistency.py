"""Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML
2023, Algorithm 1) on a discrete VP schedule.

Each step maps x_t to the model's x0 estimate f(x_t, t) and re-noises it to the next time,
x_s = sqrt(ab_s) f(x_t, t) + sigma_s z; the final step returns f itself. It is the one step with
the table ``fastdiff._C.consistency_table`` (c_x0 = sqrt(ab_s), std = sigma_s, no x_t or eps
term), so any prediction type works. Training a consistency model: fastdiff.training.consistency.
"""
from __future__ import annotations

import numpy as np

from .._ext import C
from .registry import register_sampler
from .vp import VPSampler


@register_sampler
class ConsistencySampler(VPSampler):
    """Multistep consistency sampling: x_s = sqrt(ab_s) x0_hat(x_t, t) + sigma_s z, x0_hat on the
    final step. ``steps`` = 1 is single-step generation. Takes Sampler's arguments
    (prediction_type, timestep_spacing, timesteps, clip_sample, ...); clip_sample clamps x0_hat
    before it is re-noised."""

    name = "consistency"

    def _host_table(self) -> np.ndarray:
        return C.consistency_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps)

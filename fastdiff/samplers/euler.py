"""Euler and Euler-ancestral in sigma space (Karras et al., 2022, "Elucidating the Design Space
of Diffusion-Based Generative Models"; k-diffusion's sample_euler / sample_euler_ancestral), as
diffusers' EulerDiscreteScheduler computes them on a discrete VP schedule.

The state is x = x0 + sigma eps; the model sees x / sqrt(sigma^2 + 1) and int-valued float
timesteps (diffusers' interpolated t). A step x_s = x + (x - x0_hat) / sigma (sigma_down - sigma)
(+ sigma_up z) is a row of ``fastdiff._C.euler_table``, and the same pass writes the next model
input already scaled: one pass per step, where diffusers' loop makes a scale_model_input pass
and a step.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .._ext import C
from ..engine.schedule import Schedule
from ..engine.sigmas import euler_init_noise_sigma, euler_sigmas
from .base import Sampler
from .registry import register_sampler


@register_sampler
class EulerSampler(Sampler):
    """Euler (diffusers' "Euler", k-diffusion's sample_euler at s_churn = 0) on a VP schedule:
    ``timestep_spacing`` "linspace" (diffusers' default), Karras / exponential / beta sigmas,
    ``final_sigmas_type``; epsilon, v_prediction or sample models."""

    name = "euler"
    ancestral = False
    scaled_input = True
    timestep_dtype = torch.float32

    def __init__(self, schedule=None, steps: Optional[int] = 30, *, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, final_sigmas_type: str = "zero", **kw):
        super().__init__(**kw)
        if self.prediction_type == "flow_prediction":
            raise ValueError("flow_prediction needs the flow path: use sampler='flow-euler'")
        if self.ancestral and self.prediction_type == "sample":
            raise ValueError("euler-a takes epsilon or v_prediction models (as diffusers' EulerAncestral)")
        self.schedule = Schedule.coerce(schedule)
        sig, ts = euler_sigmas(self.schedule.alphas_cumprod.numpy(), steps, timestep_spacing=timestep_spacing,
                               steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas,
                               use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                               final_sigmas_type=final_sigmas_type, prediction_type=self.prediction_type)
        sig = np.array(sig[: len(ts) + 1], dtype=np.float64)
        sig.setflags(write=False)
        self.sigmas = sig
        self._set_timesteps(np.array(ts, dtype=np.float64))
        self.init_noise_sigma = float(euler_init_noise_sigma(sig, timestep_spacing))
        self.first_input_scale = float(1.0 / np.sqrt(sig[0] ** 2 + 1.0))
        self.uses_noise = self.ancestral

    def _host_table(self) -> np.ndarray:
        return C.euler_table(self.sigmas, self.timesteps, self.prediction_type, self.ancestral)


@register_sampler
class EulerAncestralSampler(EulerSampler):
    """Euler-ancestral (diffusers' "Euler a"): each step goes down to sigma_down and adds sigma_up z,
    z drawn in the kernel."""

    name = "euler-a"
    ancestral = True

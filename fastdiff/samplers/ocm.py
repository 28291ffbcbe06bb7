"""OCM: covariance-aware sampling with a diagonal posterior covariance (Ou et al., 2024,
"Improving Probabilistic Diffusion Models With Optimal Covariance Matching"; code J-zin/OCM_DPM).

A head h_phi(x_t, t) predicts h = sigma_t^2 diag nabla^2 log p_t(x_t). By the second-order
Tweedie identity the diagonal of Cov[x0|x_t] is Sigma0 = (sigma_t^2 / ab_t)(1 + h). The
reverse step keeps the DDPM / DDIM mean and adds the uncertainty of x0_hat, per element:

    OCM-DDPM:  Var = beta_tilde + (sqrt(ab_s) beta_{t|s} / sigma_t^2)^2 Sigma0
    OCM-DDIM:  Var = lambda^2 + (sqrt(ab_s) - sqrt(sigma_s^2 - lambda^2) sqrt(ab_t) / sigma_t)^2 Sigma0

The coefficient of Sigma0 is the derivative of x_s with respect to x0_hat at fixed x_t (the
table's ``c_cov`` column), so both are the one step's ``var_mode="ocm"``:
Var = min(std^2 + c_cov^2 clamp(cov_scale (1 + h), 0, cov_max), var_max), times the table's
``noise`` flag (0 on the final step, which returns the mean). fastdiff._C builds the tables
(``ocm=True``); the head's training objective is in fastdiff.training.ocm.

Head convention. An OCM sampler gets h in one of two ways:
  * ``head=callable(x_t, t) -> h`` given to the sampler (the exact test-bed head
    ``GaussianMixture.head()``, a trained ``nn.Module``, or ``ProbeHead`` for the training-free
    estimate); the model returns its usual output;
  * ``head=None``: the model returns ``(output, h)`` (a network with two output heads).
h has x_t's shape and a floating dtype; it goes to the step in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .._ext import C
from ..engine.checks import check_real
from .base import Sampler
from .registry import register_sampler
from .vp import DDIMSampler, DDPMSampler


def second_to_last_var_cap(clip_pixels: float) -> float:
    """Analytic-DPM's variance clip (Bao et al., 2022; also used by the OCM code): at the
    second-to-last step the noise variance is capped at (clip_pixels * 2/255 * sqrt(pi/2))^2, so
    the mean absolute noise sigma * sqrt(2/pi) is at most ``clip_pixels`` widths of an 8-bit
    pixel on data in [-1, 1] (their default: 2). fastdiff._C computes and applies it."""
    return C.second_to_last_var_cap(float(clip_pixels))


class _OCMHead(Sampler):
    """What the two OCM samplers share: the head, Sigma0's cap, the noise on every step."""

    var_mode = "ocm"

    def __init__(self, schedule=None, *args, head: Optional[Callable] = None, cov_max: Optional[float] = 1.0,
                 clip_pixels: Optional[float] = None, **kw):
        super().__init__(schedule, *args, **kw)  # the base sampler's own steps default
        self._ocm_init(head, cov_max, clip_pixels)

    def _ocm_init(self, head, cov_max, clip_pixels):
        if head is not None and not callable(head):
            raise TypeError(f"head must be a callable (x_t, t) -> h or None, got {type(head).__name__}")
        self.head = head
        self.cov_max = math.inf if cov_max is None else check_real("cov_max (None for no cap)", cov_max, 0,
                                                                   lo_open=True, allow_inf=True)
        self.clip_pixels = None if clip_pixels is None else check_real("clip_pixels (or None)", clip_pixels, 0,
                                                                       lo_open=True)
        self._replace_options(var_mode="ocm", cov_max=self.cov_max)
        # The covariance term injects noise even where the base sampler has none (DDIM, eta = 0).
        self.uses_noise = True

    def _extra_key(self) -> tuple:
        return ("head", id(self.head))

    def _call_model(self, model, x, t):
        if self.head is None:
            out = model(x, t)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError("with head=None an OCM sampler needs model(x_t, t) to return (output, h); "
                                "otherwise pass head=callable(x_t, t) -> h")
            output, h = out
        else:
            output, h = model(x, t), self.head(x, t)
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"the covariance head must return a tensor, got {type(h).__name__}")
        if not h.is_floating_point():
            raise TypeError(f"the covariance head must return a floating-point tensor, got {h.dtype}")
        # h goes to the kernel in float32 whatever x's dtype: Sigma0 = (sigma^2/ab)(1 + h) multiplies
        # the rounding of h by sigma^2/ab (~2.5e4 at t = 999), so a bf16 h would lose Sigma0 there.
        return output, (h if h.dtype == torch.float32 else h.float())


@register_sampler
class OCMDDPMSampler(_OCMHead, DDPMSampler):
    """OCM-DDPM: the DDPM ancestral mean with variance
    beta_tilde + (sqrt(ab_s) beta_{t|s}/sigma_t^2)^2 clamp((sigma_t^2/ab_t)(1 + h), 0, cov_max).

    ``head``: callable (x_t, t) -> h, or None when the model returns (output, h).
    ``cov_max``: upper clamp of Sigma0 (1 for data in [-1, 1]; None for no cap).
    ``clip_pixels``: cap the variance of the second-to-last step (see ``second_to_last_var_cap``);
    None (default) leaves it alone.
    """

    name = "ocm-ddpm"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, head: Optional[Callable] = None,
                 cov_max: Optional[float] = 1.0, clip_pixels: Optional[float] = None, **kw):
        variance_type = kw.pop("variance_type", "fixed_small")
        if variance_type not in ("fixed_small", "fixed_small_log"):
            raise ValueError("OCM-DDPM adds the covariance term to the fixed_small variance beta_tilde (the "
                             f"variance of q(x_s | x_t, x0)); variance_type must be 'fixed_small', "
                             f"got {variance_type!r}")
        super().__init__(schedule, steps, variance_type=variance_type, **kw)
        self._ocm_init(head, cov_max, clip_pixels)

    def _host_table(self) -> np.ndarray:
        return C.ddpm_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.variance_type, 1.0, "last", ocm=True, clip_pixels=self.clip_pixels or 0.0)


@register_sampler
class OCMDDIMSampler(_OCMHead, DDIMSampler):
    """OCM-DDIM (any eta): the DDIM mean with variance
    lambda^2 + (sqrt(ab_s) - sqrt(sigma_s^2 - lambda^2) sqrt(ab_t)/sigma_t)^2 clamp(Sigma0, 0, cov_max),
    non-zero even at eta = 0. Arguments as OCMDDPMSampler, plus DDIMSampler's (eta, ...)."""

    name = "ocm-ddim"

    def _host_table(self) -> np.ndarray:
        return C.ddim_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.eta, self._final_alpha_cumprod(), ocm=True, clip_pixels=self.clip_pixels or 0.0)

"""The rectified-flow path, x_t = (1 - sigma) x0 + sigma eps (SD3, Flux, Wan, LTX, ...): Euler,
the stochastic sampler, DDIM(eta) on the path and OCM for flow models, all rows of
``fastdiff._C.flow_table`` for the one step.

The model predicts the velocity u = eps - x0 (``prediction_type="flow_prediction"``; "epsilon"
and "sample" also work on this path) and is called as ``model(x_t, t)`` with
t = sigma * num_train_timesteps in float32 [batch], diffusers' timesteps.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np
import torch

from .._ext import C
from ..engine.predictions import FLOW_PREDICTIONS
from ..engine.schedule import FlowSchedule
from .base import Sampler
from .ocm import _OCMHead
from .registry import register_sampler
from .vp import check_eta



class FlowSampler(Sampler):
    """A sampler on a FlowSchedule: ``steps`` sigmas by the schedule's rules (``mu`` or
    ``image_seq_len`` with dynamic shifting), or explicit ``sigmas`` / ``timesteps`` lists as
    pipelines pass them. Other keywords: Sampler's (prediction_type, clip_sample, backend, ...)."""

    timestep_dtype = torch.float32
    kind = "ddim"

    def __init__(self, schedule=None, steps: Optional[int] = 28, *, mu: Optional[float] = None,
                 image_seq_len: Optional[int] = None, sigmas: Optional[Sequence[float]] = None,
                 timesteps: Optional[Sequence[float]] = None, prediction_type: str = "flow_prediction",
                 eta: float = 0.0, **kw):
        if prediction_type not in FLOW_PREDICTIONS:
            raise ValueError(f"prediction_type on the flow path must be one of {FLOW_PREDICTIONS}, got "
                             f"{prediction_type!r} (v_prediction assumes a^2 + b^2 = 1, the VP path)")
        super().__init__(prediction_type=prediction_type, **kw)
        self.schedule = FlowSchedule.coerce(schedule)
        if (sigmas is not None or timesteps is not None) and steps is not None and steps != len(
                sigmas if sigmas is not None else timesteps):
            raise ValueError("give steps or a sigmas / timesteps list, not both")
        sig, ts = self.schedule.sigmas(None if (sigmas is not None or timesteps is not None) else steps, mu=mu,
                                       image_seq_len=image_seq_len, sigmas=sigmas, timesteps=timesteps)
        if not sig[-1] < sig[0]:
            raise ValueError("the flow samplers integrate from noise towards data: sigmas must descend "
                             "(invert_sigmas is a diffusers drop-in option only)")
        if prediction_type == "epsilon" and sig[0] >= 1.0:
            raise ValueError("an epsilon prediction cannot give x0 at sigma = 1 (x_t is pure noise, a = 0); use "
                             "prediction_type='flow_prediction' or 'sample', or sigmas that start below 1")
        sig = np.array(sig, dtype=np.float64)
        sig.setflags(write=False)
        self.sigmas = sig
        self._set_timesteps(np.array(ts, dtype=np.float64))
        self.eta = check_eta(eta)

    def _kind(self) -> str:
        return self.kind

    def _host_table(self) -> np.ndarray:
        return C.flow_table(self.sigmas, self.timesteps, self._kind(), self.eta)


@register_sampler
class FlowEulerSampler(FlowSampler):
    """Flow-matching Euler (the ODE step of diffusers' FlowMatchEulerDiscreteScheduler):
    x_s = x_t + (sigma_s - sigma_t) u for a velocity model; DDIM at eta = 0 on the flow path,
    x_s = (1 - sigma_s) x0_hat + sigma_s eps_hat, for epsilon / sample models."""

    name = "flow-euler"

    def __init__(self, schedule=None, steps: Optional[int] = 28, **kw):
        if kw.get("eta", 0.0):
            raise ValueError("flow-euler is deterministic; use sampler='flow-ddim' for eta > 0")
        super().__init__(schedule, steps, **kw)
        self.uses_noise = False

    def _kind(self) -> str:
        return "euler" if self.prediction_type == "flow_prediction" else "ddim"


@register_sampler
class FlowStochasticSampler(FlowSampler):
    """Stochastic flow sampling (diffusers' ``stochastic_sampling=True``): x0_hat re-noised to the
    next sigma, x_s = (1 - sigma_s) x0_hat + sigma_s z; the last step returns x0_hat."""

    name = "flow-stochastic"
    kind = "stochastic"


@register_sampler
class FlowDDIMSampler(FlowSampler):
    """DDIM(eta) on the flow path: x_s = (1 - sigma_s) x0_hat + sqrt(sigma_s^2 - lambda^2) eps_hat +
    lambda z, lambda^2 = eta^2 Var[q(x_s | x_t, x0)]; eta = 0 is Euler, eta = 1 ancestral."""

    name = "flow-ddim"

    def __init__(self, schedule=None, steps: Optional[int] = 28, **kw):
        super().__init__(schedule, steps, **kw)
        self.uses_noise = self.eta > 0  # eta = 0: no noise pass (every std is 0)


@register_sampler
class OCMFlowSampler(_OCMHead, FlowSampler):
    """OCM for flow models: the flow-ddim mean (Euler at the default eta = 0) with its noise widened
    by the x0_hat uncertainty, Var = lambda^2 + c_cov^2 clamp((sigma_t/(1 - sigma_t))^2 (1 + h), 0,
    cov_max), h ~ sigma_t^2 diag nabla^2 log p_t(x_t) from a head (fastdiff.samplers.ocm for the
    head convention; fastdiff.training.ocm.train_head trains one when given a FlowSchedule). The last step returns the
    mean."""

    name = "ocm-flow"

    def _host_table(self) -> np.ndarray:
        return C.flow_table(self.sigmas, self.timesteps, "ddim", self.eta, ocm=True,
                            clip_pixels=self.clip_pixels or 0.0)

"""The discrete VP path (x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps): ``VPSampler`` (schedule and
timestep selection) and DDIM / DDPM, two C++ tables for the one step."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .._ext import C
from ..engine.checks import check_real
from ..engine.schedule import Schedule, next_timesteps
from .base import Sampler
from .registry import register_sampler


class VPSampler(Sampler):
    """A sampler on a discrete VP schedule: ``schedule`` (a Schedule, a name or a dict), ``steps``
    timesteps chosen by ``timestep_spacing`` (diffusers' rules, ``steps_offset`` for leading) or
    an explicit descending ``timesteps`` list; the model gets int64 timesteps. Other keywords:
    Sampler's (prediction_type, clip_sample, thresholding, backend, ...)."""

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, timestep_spacing: str = "trailing",
                 steps_offset: int = 0, timesteps=None, **kw):
        super().__init__(**kw)
        if self.prediction_type == "flow_prediction":
            raise ValueError("flow_prediction is a velocity on the flow path (a + b = 1); use a flow sampler "
                             "(sampler='flow-euler', ...) with a FlowSchedule")
        self.schedule = Schedule.coerce(schedule)
        ts = self.schedule.timesteps(None if timesteps is not None else steps, timestep_spacing, steps_offset,
                                     timesteps)
        self._set_timesteps(ts)
        prev = next_timesteps(ts)
        prev.setflags(write=False)
        self.prev_timesteps = prev
        ab = self.schedule.alphas_cumprod
        if self.prediction_type == "epsilon" and float(ab[int(ts[0])]) == 0.0:
            raise ValueError(
                "alpha_bar is 0 at the first timestep (zero terminal SNR), where an epsilon prediction "
                "cannot give x0 (it divides by sqrt(alpha_bar) = 0); use prediction_type='v_prediction' "
                "or a spacing that does not start at the last training step")


def check_eta(eta) -> float:
    return check_real("eta", eta, 0)


@register_sampler
class DDIMSampler(VPSampler):
    """DDIM (Song, Meng & Ermon, 2021, eq. 12) with stochasticity eta:
    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - lambda^2) eps_hat + lambda z,
    lambda^2 = eta^2 (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s). eta = 0 is deterministic, eta = 1
    has DDPM's fixed_small variance.

    ``set_alpha_to_one`` (default) makes the final step land on alpha_bar = 1; otherwise on
    alpha_bar at timestep 0. ``prev_timestep_rule`` "next" steps to the next listed timestep;
    "ratio" steps to t - num_train_timesteps // steps as diffusers' DDIMScheduler does (not with
    an explicit timesteps list, whose steps it would leave).
    """

    name = "ddim"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, eta: float = 0.0, set_alpha_to_one: bool = True,
                 prev_timestep_rule: str = "next", **kw):
        eta = check_eta(eta)
        if prev_timestep_rule not in ("next", "ratio"):
            raise ValueError(f"prev_timestep_rule must be 'next' or 'ratio', got {prev_timestep_rule!r}")
        if prev_timestep_rule == "ratio" and kw.get("timesteps") is not None:
            raise ValueError("prev_timestep_rule='ratio' steps to t - num_train_timesteps // steps, which an "
                             "explicit timesteps list need not contain; use prev_timestep_rule='next' with it")
        super().__init__(schedule, steps, **kw)
        self.eta = eta
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.prev_timestep_rule = prev_timestep_rule
        if prev_timestep_rule == "ratio":
            prev = self.timesteps - self.schedule.num_train_timesteps // self.steps
            prev.setflags(write=False)
            self.prev_timesteps = prev
        self.uses_noise = self.eta > 0

    def _final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.schedule.alphas_cumprod[0])

    def _host_table(self) -> np.ndarray:
        return C.ddim_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.eta, self._final_alpha_cumprod())


@register_sampler
class DDPMSampler(VPSampler):
    """DDPM ancestral sampling (Ho, Jain & Abbeel, 2020) on any timestep subsequence:
    x_s = sqrt(ab_s) beta_{t|s}/(1 - ab_t) x0_hat + sqrt(ab_t/ab_s) (1 - ab_s)/(1 - ab_t) x_t + sqrt(v) z
    with v = beta_tilde ("fixed_small") or beta_{t|s} ("fixed_large"); no noise on the last step.
    """

    name = "ddpm"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, variance_type: str = "fixed_small", **kw):
        if "eta" in kw:
            raise TypeError("DDPM has no eta: its noise is fixed by variance_type ('fixed_small' is DDIM's eta = 1); "
                            "for another eta use sampler='ddim'")
        if variance_type not in ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log"):
            raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large' (or their _log names) for "
                             f"DDPMSampler, got {variance_type!r}; learned variances need the model's "
                             "variance output (fastdiff.diffusers.DDPMScheduler)")
        super().__init__(schedule, steps, **kw)
        self.variance_type = variance_type

    def _host_table(self) -> np.ndarray:
        return C.ddpm_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.variance_type, 1.0, "last")

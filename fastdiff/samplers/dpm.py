"""DPM-Solver++ multistep (Lu, Zhou, Bao, Chen, Li & Zhu, 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models"), orders 1 and 2, ODE ("dpmpp-2m") and SDE
("dpmpp-2m-sde") variants, as diffusers' DPMSolverMultistepScheduler computes them.

With lambda = log(alpha / sigma) and h = lambda_s - lambda_t, a second-order step is

    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D0 - 1/2 alpha_s (e^-h - 1) D1     (midpoint)

with D0 = x0_hat and D1 = (x0_hat - x0_hat_prev) / r, r = h_prev / h: a row of
``fastdiff._C.dpm_table`` over x_t, x0_hat and one history tensor (the previous x0_hat, column
c_h0), which the step writes for the next one. Still one pass over memory per step.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .._ext import C
from ..engine.schedule import FlowSchedule, Schedule
from ..engine.sigmas import dpm_sigmas
from .base import Sampler
from .registry import register_sampler


class _DPMSolver(Sampler):
    """Shared: the sigmas, the table, the history slot. ``solver_order`` 1 or 2, ``solver_type``
    "midpoint" or "heun", ``lower_order_final`` (first order at the last step below 15 steps,
    diffusers' default), ``euler_at_final``."""

    algorithm_type = "dpmsolver++"
    history_slots = 1

    def _dpm_init(self, solver_order, solver_type, lower_order_final, euler_at_final):
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.solver_order, self.solver_type = int(solver_order), solver_type
        self.lower_order_final, self.euler_at_final = bool(lower_order_final), bool(euler_at_final)
        self.uses_noise = self.algorithm_type.startswith("sde")

    def _host_table(self) -> np.ndarray:
        full = C.dpm_table(self.sigmas, np.asarray(self.timesteps, dtype=np.float64), self.flow, self.algorithm_type,
                           self.solver_type, self.solver_order, self.lower_order_final, self.euler_at_final,
                           bool(self.sigmas[-1] == 0.0))
        return full[: self.steps]  # a native loop always starts at the first step


@register_sampler
class DPMSolverSampler(_DPMSolver):
    """DPM-Solver++(2M) on a discrete VP schedule (diffusers' "DPM++ 2M"; with
    ``use_karras_sigmas=True`` "DPM++ 2M Karras"). Timesteps and sigmas follow diffusers'
    DPMSolverMultistepScheduler (``timestep_spacing`` "linspace" by default,
    ``final_sigmas_type`` "zero"); the model gets int64 timesteps and x_t unscaled."""

    name = "dpmpp-2m"
    flow = False

    def __init__(self, schedule=None, steps: Optional[int] = 20, *, solver_order: int = 2,
                 solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 final_sigmas_type: str = "zero", timesteps=None, **kw):
        super().__init__(**kw)
        if self.prediction_type == "flow_prediction":
            raise ValueError("flow_prediction needs the flow path: use sampler='flow-dpmpp-2m'")
        self.schedule = Schedule.coerce(schedule)
        sig, ts = dpm_sigmas(self.schedule.alphas_cumprod.numpy(), None if timesteps is not None else steps,
                             timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                             use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                             use_beta_sigmas=use_beta_sigmas, use_lu_lambdas=use_lu_lambdas,
                             final_sigmas_type=final_sigmas_type, beta_schedule=self.schedule.beta_schedule,
                             timesteps=timesteps)
        sig = np.array(sig, dtype=np.float64)
        sig.setflags(write=False)
        self.sigmas = sig
        self._set_timesteps(np.array(ts, dtype=np.int64))
        self._dpm_init(solver_order, solver_type, lower_order_final, euler_at_final)


@register_sampler
class DPMSolverSDESampler(DPMSolverSampler):
    """SDE-DPM-Solver++(2M) (diffusers' algorithm_type "sde-dpmsolver++"): the second-order step
    with the noise of the SDE drawn in the kernel."""

    name = "dpmpp-2m-sde"
    algorithm_type = "sde-dpmsolver++"


@register_sampler
class FlowDPMSolverSampler(_DPMSolver):
    """DPM-Solver++(2M) on the flow path (alpha = 1 - sigma), sigmas from a FlowSchedule as the
    flow samplers take them; the model gets float32 t = sigma * N."""

    name = "flow-dpmpp-2m"
    flow = True
    timestep_dtype = torch.float32

    def __init__(self, schedule=None, steps: Optional[int] = 20, *, solver_order: int = 2,
                 solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                 mu: Optional[float] = None, image_seq_len: Optional[int] = None, sigmas=None,
                 prediction_type: str = "flow_prediction", **kw):
        if prediction_type not in ("flow_prediction", "sample"):
            raise ValueError(f"prediction_type on the flow path must be 'flow_prediction' or 'sample' for "
                             f"flow-dpmpp-2m, got {prediction_type!r}")
        super().__init__(prediction_type=prediction_type, **kw)
        self.schedule = FlowSchedule.coerce(schedule)
        sig, ts = self.schedule.sigmas(None if sigmas is not None else steps, mu=mu, image_seq_len=image_seq_len,
                                       sigmas=sigmas)
        if sig[0] >= 1.0:
            # lambda = log((1 - sigma) / sigma) is -inf at sigma = 1 (x0_hat from a velocity is still fine,
            # but the step size h is infinite): start just below, as diffusers' flow sigmas do.
            raise ValueError("flow-dpmpp-2m needs sigmas below 1 (lambda = log((1 - sigma) / sigma)); the default "
                             "FlowSchedule starts at 1: pass shift / sigmas that start below it, e.g. "
                             "sigmas=numpy.linspace(0.999, 0.02, steps)")
        sig = np.array(sig, dtype=np.float64)
        sig.setflags(write=False)
        self.sigmas = sig
        self._set_timesteps(np.array(ts, dtype=np.float64))
        self._dpm_init(solver_order, solver_type, lower_order_final, euler_at_final)


@register_sampler
class FlowDPMSolverSDESampler(FlowDPMSolverSampler):
    """SDE-DPM-Solver++(2M) on the flow path (diffusers' DPMSolverMultistepScheduler with
    ``use_flow_sigmas=True`` and algorithm_type "sde-dpmsolver++"): the noise drawn in the kernel."""

    name = "flow-dpmpp-2m-sde"
    algorithm_type = "sde-dpmsolver++"

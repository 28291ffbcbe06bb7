"""UniPC (Zhao, Bai, Rao, Zhou & Lu, 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models"), orders 1-3, B(h) variants bh1 / bh2, on VP schedules ("unipc")
and on the flow path ("flow-unipc", as Wan configures diffusers' UniPCMultistepScheduler), as
diffusers computes them.

Each step corrects x_t with UniC (using this step's model output) and predicts the next sample
with UniP. Both are linear in x_t, this step's data prediction M_i and the previous ones
M_{i-1}, M_{i-2}, M_{i-3}; and since x_t is the previous predictor's output, which shares its
base terms with the corrector, the correction is x_t plus a combination of predictions alone.
So one row of ``fastdiff._C.unipc_table`` over x_t, x0_hat and up to three history tensors is
the whole predictor-corrector step: one pass over memory, one model call per step, as diffusers'
loop has (its corrector reuses the model output of the next step's input).

A ``callback`` that edits x in place therefore edits the base the next correction starts from;
diffusers' scheduler corrects from the corrected sample it kept (last_sample), whatever the
latents became. For that behaviour with edited latents, use the drop-in
(``fastdiff.diffusers.UniPCMultistepScheduler``), which keeps the corrected sample.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .._ext import C
from ..engine.schedule import FlowSchedule, Schedule
from ..engine.sigmas import unipc_sigmas
from .base import Sampler
from .registry import register_sampler


class _UniPC(Sampler):
    """Shared: the solver options and the table. ``solver_order`` 1-3 (2 recommended for guided
    sampling, 3 unguided), ``solver_type`` "bh2" (default) or "bh1", ``lower_order_final``,
    ``disable_corrector`` (step indices whose *next* step skips the corrector, as diffusers),
    ``predict_x0`` (False: the noise-prediction form)."""

    flow = False

    def _unipc_init(self, solver_order, solver_type, lower_order_final, disable_corrector, predict_x0):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
        disable = tuple(sorted({int(j) for j in disable_corrector}))
        self.solver_order, self.solver_type = int(solver_order), solver_type
        self.lower_order_final, self.disable_corrector = bool(lower_order_final), disable
        self.predict_x0 = bool(predict_x0)
        self.history_slots = self.solver_order  # the corrector of order p reads M_{i-1} .. M_{i-p}
        self.history_output = "x0" if self.predict_x0 else "eps"
        self.uses_noise = False
        if self.thresholding and not self.predict_x0:
            raise ValueError("thresholding applies to data predictions: it needs predict_x0=True")

    def _host_table(self) -> np.ndarray:
        return C.unipc_table(self.sigmas, np.asarray(self.timesteps, dtype=np.float64), self.flow, self.solver_order,
                             self.solver_type, self.lower_order_final, list(self.disable_corrector), self.predict_x0,
                             0, False)

    def _extra_key(self) -> tuple:
        return (self.history_slots, self.history_output)


@register_sampler
class UniPCSampler(_UniPC):
    """UniPC on a discrete VP schedule, timesteps and sigmas as diffusers' UniPCMultistepScheduler
    makes them (``timestep_spacing`` "linspace" by default, Karras / exponential / beta sigmas,
    ``final_sigmas_type`` "zero"); the model gets int64 timesteps and x_t unscaled."""

    name = "unipc"

    def __init__(self, schedule=None, steps: Optional[int] = 20, *, solver_order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = (), predict_x0: bool = True,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 final_sigmas_type: str = "zero", **kw):
        super().__init__(**kw)
        if self.prediction_type == "flow_prediction":
            raise ValueError("flow_prediction needs the flow path: use sampler='flow-unipc'")
        self.schedule = Schedule.coerce(schedule)
        sig, ts = unipc_sigmas(self.schedule.alphas_cumprod.numpy(), steps, timestep_spacing=timestep_spacing,
                               steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas,
                               use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                               final_sigmas_type=final_sigmas_type)
        sig = np.array(sig, dtype=np.float64)
        sig.setflags(write=False)
        self.sigmas = sig
        self._set_timesteps(np.array(ts, dtype=np.int64))
        self._unipc_init(solver_order, solver_type, lower_order_final, disable_corrector, predict_x0)


@register_sampler
class FlowUniPCSampler(_UniPC):
    """UniPC on the flow path x = (1 - sigma) x0 + sigma eps, with diffusers' UniPC flow sigmas
    (``use_flow_sigmas=True``: sigma_i = linspace(1, 1/N, K + 1)[:-1], shifted by the schedule's
    ``shift`` (Wan's ``flow_shift``) or by ``mu`` with dynamic shifting, ``shift_terminal``, and a
    first sigma of 1 moved to 1 - 1e-6) or an explicit ``sigmas`` list. The model gets diffusers'
    int64 timesteps (sigma * N, truncated) and predicts the velocity (``prediction_type``
    "flow_prediction") or x0 ("sample")."""

    name = "flow-unipc"
    flow = True

    def __init__(self, schedule=None, steps: Optional[int] = 20, *, solver_order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
                 mu: Optional[float] = None, final_sigmas_type: str = "zero", sigmas=None,
                 prediction_type: str = "flow_prediction", **kw):
        if prediction_type not in ("flow_prediction", "sample"):
            raise ValueError(f"prediction_type on the flow path must be 'flow_prediction' or 'sample' for "
                             f"flow-unipc, got {prediction_type!r}")
        super().__init__(prediction_type=prediction_type, **kw)
        self.schedule = FlowSchedule.coerce(schedule)
        s = self.schedule
        if s.use_karras_sigmas or s.use_exponential_sigmas or s.use_beta_sigmas:
            raise ValueError("flow-unipc takes diffusers' UniPC flow sigmas (shift, dynamic shifting, "
                             "shift_terminal) or an explicit sigmas list; Karras / exponential / beta spacing "
                             "of flow sigmas is a FlowMatchEuler rule: pass sigmas= instead")
        if s.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu")
        sig, ts = unipc_sigmas(Schedule(num_train_timesteps=s.num_train_timesteps).alphas_cumprod.numpy(), None if sigmas is not None else steps,
                               use_flow_sigmas=True, flow_shift=s.shift, use_dynamic_shifting=s.use_dynamic_shifting,
                               mu=mu, time_shift_type=s.time_shift_type, shift_terminal=s.shift_terminal,
                               final_sigmas_type=final_sigmas_type, sigmas=sigmas)
        sig = np.array(sig, dtype=np.float64)
        sig.setflags(write=False)
        self.sigmas = sig
        self._set_timesteps(np.array(ts, dtype=np.int64))
        self._unipc_init(solver_order, solver_type, lower_order_final, disable_corrector, True)

"""The drop-in for diffusers' FlowMatchEulerDiscreteScheduler (SD3, Flux, Wan, LTX, ... pipelines).

Constructor, config, ``scale_noise``, ``set_shift``, ``step_index`` / ``begin_index`` /
``set_begin_index`` and ``time_shift`` are diffusers' own. ``set_timesteps`` computes the sigmas
in float64 in fastdiff._C (equal to diffusers' float32 values) and ``step`` is the one fused step
on a table of flow rows (Euler: x_t + (sigma_s - sigma_t) u; ``stochastic_sampling``:
(1 - sigma_s) x0_hat + sigma_s z). Where diffusers syncs the host at the first step
(``index_for_timestep``: ``.nonzero().item()``), the step index is found from the host copy of
the timesteps; steps then count on the host, with no sync.

Differences from diffusers 0.42.1: a half-precision ``model_output`` is widened exactly and the
update computed in float32 and rounded once (diffusers rounds dt * u to the model's dtype
first, so results can differ by one ulp of that dtype); ``per_token_timesteps`` runs diffusers'
own step (per-token sigmas are not rows of a table); ``mu`` without use_dynamic_shifting is
ignored, as diffusers does.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import \
    FlowMatchEulerDiscreteScheduler as _DiffusersFlowMatchEuler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .._ext import C
from ..engine.sigmas import flow_sigmas
from ..engine.step import StepOptions, step
from ..engine.tables import Table
from .common import _FastStepMixin, _version_of

_OPTIONS = StepOptions(prediction_type="flow_prediction")


def _f32(v) -> float:
    return float(np.float32(v))  # diffusers compares float32 timesteps


class FlowMatchEulerDiscreteScheduler(_FastStepMixin, _DiffusersFlowMatchEuler):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` with fastdiff's fused step (see the module
    docstring for what differs). Extra: ``set_noise_seed`` (in-kernel Philox noise for
    ``stochastic_sampling``), ``backend``."""

    __module__ = "fastdiff.diffusers"  # the public module, which saved pipelines name

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas=None, mu: Optional[float] = None, timesteps=None):
        """diffusers' rules (shift or dynamic shifting by ``mu``, shift_terminal, Karras /
        exponential / beta sigmas, invert_sigmas, custom ``sigmas`` / ``timesteps``), computed in
        float64 by fastdiff._C; ``.sigmas`` and ``.timesteps`` hold the same float32 values as
        diffusers'."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("`sigmas` and `timesteps` should have the same length")
        if num_inference_steps is not None and (
                (sigmas is not None and len(sigmas) != num_inference_steps)
                or (timesteps is not None and len(timesteps) != num_inference_steps)):
            raise ValueError("`sigmas` and `timesteps` should have the same length as num_inference_steps, if "
                             "`num_inference_steps` is provided")
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        as_list = (lambda v: None if v is None else (v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor)
                                                     else np.asarray(v, dtype=np.float64)))
        sig, ts = flow_sigmas(
            None if (sigmas is not None or timesteps is not None) else num_inference_steps,
            num_train_timesteps=int(cfg.num_train_timesteps), shift=float(self.shift),
            use_dynamic_shifting=bool(cfg.use_dynamic_shifting), mu=mu if cfg.use_dynamic_shifting else None,
            time_shift_type=cfg.time_shift_type, shift_terminal=cfg.shift_terminal or None,
            use_karras_sigmas=bool(cfg.use_karras_sigmas), use_exponential_sigmas=bool(cfg.use_exponential_sigmas),
            use_beta_sigmas=bool(cfg.use_beta_sigmas), invert_sigmas=bool(cfg.invert_sigmas),
            sigmas=as_list(sigmas), timesteps=as_list(timesteps), sigma_min=float(self.sigma_min),
            sigma_max=float(self.sigma_max))
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        self.sigmas = torch.from_numpy(np.asarray(sig, dtype=np.float32)).to(device)
        self._step_index = None
        self._begin_index = None
        st = self._fd
        # The table is built from diffusers' float32 values widened exactly: then dt = s - t in
        # float64 rounds to the float32 difference diffusers computes.
        st.host_sigmas = np.asarray(sig, dtype=np.float32).astype(np.float64)
        st.host_ts = np.asarray(ts, dtype=np.float32).astype(np.float64)
        st.ts_obj, st.ts_version = self.timesteps, _version_of(self.timesteps)
        st.ts_key = hash((st.host_sigmas.tobytes(), st.host_ts.tobytes()))

    def _table(self) -> Table:
        st = self._fd
        kind = "stochastic" if self.config.stochastic_sampling else "euler"
        return self._cached_table(("flow", kind, st.ts_key),
                                  lambda: C.flow_table(st.host_sigmas, st.host_ts, kind, 0.0))

    # -- the step index, without a host sync ------------------------------------------------------
    def _init_step_index(self, timestep) -> None:
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        host = self._host_value(timestep, _f32) if self._fd.host_ts is not None else None
        if host is None:  # a device value we cannot read for free: diffusers' lookup (one sync)
            super()._init_step_index(timestep)
            return
        self._step_index = C.index_for_timestep(self._fd.host_ts, host)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[FlowMatchEulerDiscreteSchedulerOutput, Tuple]:
        """One Euler step sigma_t -> sigma_s (or the stochastic step), one fused launch. Arguments
        and result as diffusers' (s_churn ... s_noise are accepted and unused, as there)."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        if per_token_timesteps is not None:
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                per_token_timesteps, return_dict)
        if self._fd.host_ts is None:
            raise ValueError("call set_timesteps before step")
        i = self._begin_step(model_output, timestep, sample)
        device = sample.device
        row = self._step_row(device, i, len(self._fd.host_ts))
        wide = model_output.dtype == torch.float64
        # diffusers upcasts the sample to float32 and casts the result to the model's dtype (the step
        # reads half precision as it is and computes in float32: the same arithmetic, one pass fewer).
        x = self._step_input(sample, wide)
        m = model_output
        noise = seed = None
        if self.config.stochastic_sampling:
            if self._fd.seed is not None:
                seed = self._seed_tensor(device)
            else:
                noise = randn_tensor(sample.shape, generator=generator, device=device, dtype=torch.float32)
                noise = noise.to(x.dtype) if wide else noise
        out = torch.empty(sample.shape, dtype=model_output.dtype, device=device)
        step(x, m, self._table(), row, _OPTIONS, noise=noise, seed=seed, out=out,
             **(self._noise_index(x) if seed is not None else {}))
        self._step_index += 1
        if not return_dict:
            return (out,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=out)

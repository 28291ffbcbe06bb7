"""The drop-ins for diffusers' EulerDiscreteScheduler (SDXL's default) and
EulerAncestralDiscreteScheduler (SDXL-Turbo's), in sigma space x = x0 + sigma eps.

``set_timesteps``, ``add_noise``, ``init_noise_sigma`` and the sigma options are diffusers' own;
the drop-in builds a float64 table from diffusers' float32 sigmas (``fastdiff._C.euler_table``)
and each ``step`` is one fused pass that also writes the next model input already scaled by
1/sqrt(sigma_s^2 + 1): ``scale_model_input`` called on the sample the step just returned hands
that tensor back instead of making its own pass (on any other tensor, e.g. a classifier-free
guidance batch, it computes diffusers' division). The step index is found without diffusers'
``.nonzero().item()`` sync.

Served by the fused step: epsilon and v_prediction (and "sample" for Euler), s_churn = 0.
Other calls (s_churn > 0) run diffusers' own step. Differences: arithmetic in float32 with
coefficients rounded once from float64; a half-precision model output is widened and the
result rounded once: outputs agree to float32 rounding (half: one ulp of the dtype).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import \
    EulerAncestralDiscreteScheduler as _DiffusersEulerAncestral
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler as _DiffusersEuler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .._ext import C
from ..engine.step import StepOptions, step
from ..engine.tables import Table
from .common import _FastStepMixin, _version_of


class _EulerMixin(_FastStepMixin):
    """What the two Euler drop-ins share: the table, the step index, the fused next input."""

    _ancestral = False
    _output = EulerDiscreteSchedulerOutput

    def set_timesteps(self, *args, **kwargs):
        """diffusers' own set_timesteps; then the host copy of its sigmas and timesteps."""
        super().set_timesteps(*args, **kwargs)
        st = self._fd
        st.host_ts = self.timesteps.detach().cpu().to(torch.float64).numpy()  # once, outside the loop
        # diffusers keeps the sigmas on the CPU; a step reads sigmas[i] and sigmas[i + 1] only
        # (interpolation_type "log_linear" makes one sigma more than it uses).
        st.host_sigmas = self.sigmas.detach().cpu().to(torch.float64).numpy()[: len(st.host_ts) + 1]
        st.ts_obj, st.ts_version = self.timesteps, _version_of(self.timesteps)
        st.ts_key = hash((st.host_sigmas.tobytes(), st.host_ts.tobytes()))
        st.next_input = None

    def _table(self) -> Table:
        st, pred = self._fd, self.config.prediction_type
        return self._cached_table(("euler", self._ancestral, pred, st.ts_key),
                                  lambda: C.euler_table(st.host_sigmas, st.host_ts, pred, self._ancestral))

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        t = self._host_value(timestep, lambda v: float(np.float32(v))) \
            if getattr(self._fd, "host_ts", None) is not None else None
        if t is None:  # a device value we cannot read for free: diffusers' lookup (one sync)
            super()._init_step_index(timestep)
            return
        self._step_index = C.index_for_timestep(self._fd.host_ts.astype(np.float32).astype(np.float64), t)

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1), as diffusers; the tensor the last step already wrote when
        ``sample`` is that step's output (no pass of its own)."""
        nxt = getattr(self._fd, "next_input", None)
        if nxt is not None and nxt[0] is sample and self.step_index == nxt[2]:
            self.is_scale_input_called = True
            return nxt[1]
        return super().scale_model_input(sample, timestep)

    def _fused_step(self, model_output, timestep, sample, generator):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `EulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        i = self._begin_step(model_output, timestep, sample)
        st = self._fd
        k = len(st.host_ts)
        device = sample.device
        wide = model_output.dtype == torch.float64
        x = self._step_input(sample, wide)
        noise = seed = None
        if self._ancestral:
            if st.seed is not None:
                seed = self._seed_tensor(device)
            else:
                noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=device, generator=generator)
                noise = noise.to(x.dtype) if wide else noise
        key = ("euler", self.config.prediction_type)
        opts = st.options.get(key)
        if opts is None:
            opts = st.options[key] = StepOptions(prediction_type=self.config.prediction_type)
        out = torch.empty(sample.shape, dtype=model_output.dtype, device=device)
        model_in = torch.empty_like(out)
        # pred_original_sample in float32 (float64 when wide), as diffusers computes it from the upcast sample
        x0 = torch.empty(sample.shape, dtype=torch.float64 if wide else torch.float32, device=device)
        step(x, model_output, self._table(), self._step_row(device, i, k), opts, noise=noise, seed=seed, out=out,
             model_in_out=model_in, x0_out=x0, **(self._noise_index(x) if seed is not None else {}))
        self._step_index += 1
        st.next_input = (out, model_in, self._step_index)
        return out, x0


class EulerDiscreteScheduler(_EulerMixin, _DiffusersEuler):
    """diffusers' ``EulerDiscreteScheduler`` with fastdiff's fused step (see the module docstring)."""

    __module__ = "fastdiff.diffusers"  # the public module, which saved pipelines name

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One Euler step sigma -> sigma_s, one fused pass (s_churn > 0: diffusers' own step)."""
        if s_churn > 0 or self.config.prediction_type not in ("epsilon", "v_prediction", "sample") \
                or getattr(self._fd, "host_ts", None) is None:
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                return_dict)
        out, x0 = self._fused_step(model_output, timestep, sample, generator)
        if not return_dict:
            return (out, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=out, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_EulerMixin, _DiffusersEulerAncestral):
    """diffusers' ``EulerAncestralDiscreteScheduler`` with fastdiff's fused step, noise in the
    same pass (see the module docstring). ``set_noise_seed`` draws it in the kernel instead."""

    __module__ = "fastdiff.diffusers"
    _ancestral = True

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One ancestral Euler step, one fused pass."""
        if self.config.prediction_type not in ("epsilon", "v_prediction") or \
                getattr(self._fd, "host_ts", None) is None:
            return super().step(model_output, timestep, sample, generator, return_dict)
        out, x0 = self._fused_step(model_output, timestep, sample, generator)
        if not return_dict:
            return (out, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=out, pred_original_sample=x0)

"""The drop-in for diffusers' DPMSolverMultistepScheduler ("DPM++ 2M", "DPM++ 2M Karras",
"DPM++ 2M SDE", and DPM-Solver++ on flow sigmas).

``set_timesteps`` is diffusers' own (its sigma and timestep rules, all options); the drop-in then
builds a float64 table of DPM-Solver++ rows from diffusers' float32 sigmas
(``fastdiff._C.dpm_table``) and each ``step`` is one fused pass: it reads x_t, the model output
and the previous x0_hat, and writes x_s and this step's x0_hat (the history the next step reads).
The step index is found without diffusers' ``.nonzero().item()`` sync and counted on the host.

Served by the fused step: algorithm_type "dpmsolver++" and "sde-dpmsolver++", solver_order 1
and 2, solver_type "midpoint" and "heun", every sigma option, epsilon / sample / v_prediction /
flow_prediction, thresholding. Other configurations (algorithm_type "dpmsolver" /
"sde-dpmsolver", solver_order 3, learned variances) run diffusers' own step, unchanged.
Differences: arithmetic in float32 with coefficients rounded once from float64 (diffusers rounds
after every float32 operation): outputs agree to float32 rounding, not bit for bit.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_dpmsolver_multistep import \
    DPMSolverMultistepScheduler as _DiffusersDPMSolverMultistep
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .._ext import C
from ..engine.step import StepOptions, step
from ..engine.tables import Table
from .common import _MultistepMixin


class DPMSolverMultistepScheduler(_MultistepMixin, _DiffusersDPMSolverMultistep):
    """diffusers' ``DPMSolverMultistepScheduler`` with fastdiff's fused step (see the module
    docstring for what it serves). Extra: ``set_noise_seed`` (in-kernel noise for the SDE
    variant), ``backend``."""

    __module__ = "fastdiff.diffusers"  # the public module, which saved pipelines name

    def _fused_config(self) -> bool:
        cfg = self.config
        return (cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++") and cfg.solver_order in (1, 2)
                and cfg.solver_type in ("midpoint", "heun") and cfg.variance_type is None
                and cfg.prediction_type in ("epsilon", "sample", "v_prediction", "flow_prediction")
                # flow_prediction on VP sigmas: diffusers reads x0 = x - sigma u with the raw sigma
                # sqrt((1 - ab) / ab), not the path's; its own step serves that mix
                and (cfg.prediction_type != "flow_prediction" or cfg.use_flow_sigmas))

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        """diffusers' own set_timesteps; then the host copy of its sigmas and timesteps."""
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, mu=mu, timesteps=timesteps)
        self._record_sigma_steps()

    def _table(self) -> Table:
        cfg, st = self.config, self._fd

        def build():
            return C.dpm_table(st.host_sigmas, st.host_ts.astype(np.float64), bool(cfg.use_flow_sigmas),
                               cfg.algorithm_type, cfg.solver_type, int(cfg.solver_order), bool(cfg.lower_order_final),
                               bool(cfg.euler_at_final), cfg.final_sigmas_type == "zero")

        return self._cached_table(("dpm", st.ts_key, cfg.algorithm_type, cfg.solver_type, cfg.solver_order,
                                   cfg.lower_order_final, cfg.euler_at_final, cfg.final_sigmas_type,
                                   cfg.use_flow_sigmas), build)

    def _options(self) -> StepOptions:
        cfg = self.config
        key = ("dpm", cfg.prediction_type, cfg.thresholding, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        opts = self._fd.options.get(key)
        if opts is None:
            opts = self._fd.options[key] = StepOptions(
                prediction_type=cfg.prediction_type, thresholding=bool(cfg.thresholding),
                dynamic_thresholding_ratio=float(cfg.dynamic_thresholding_ratio),
                sample_max_value=float(cfg.sample_max_value))
        return opts

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True) -> Union[SchedulerOutput, Tuple]:
        """One DPM-Solver++ step (first or second order as diffusers chooses), one fused pass.
        Arguments and result as diffusers'."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if not self._fused_config() or getattr(self._fd, "host_sigmas", None) is None:
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        i = self._begin_step(model_output, timestep, sample)
        st = self._fd
        k = len(st.host_ts)
        device = sample.device
        # Row i when a previous x0_hat exists (diffusers' lower_order_nums >= 1), else its
        # first-order twin K + i: the order follows the steps taken, as in diffusers.
        second = self.lower_order_nums >= 1
        row = self._step_row(device, i if second else k + i, 2 * k)
        wide = model_output.dtype == torch.float64 or sample.dtype == torch.float64
        x = self._step_input(sample, wide)
        m = model_output.to(torch.float64) if wide else model_output
        dt = torch.float64 if wide else torch.float32  # the x0_hat history: float32 (float64 when wide)
        hist_key = (device, tuple(sample.shape), dt)
        bufs = st.history.get(hist_key)
        if bufs is None:
            bufs = st.history[hist_key] = [torch.zeros(sample.shape, dtype=dt, device=device) for _ in range(2)]
        prev, new = bufs[i % 2], bufs[(i + 1) % 2]
        noise = seed = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            if variance_noise is not None:
                noise = variance_noise.to(device=device, dtype=dt)
            elif st.seed is not None:
                seed = self._seed_tensor(device)
            else:
                noise = randn_tensor(model_output.shape, generator=generator, device=device, dtype=torch.float32)
                noise = noise.to(dt)
        out = torch.empty(sample.shape, dtype=dt if wide else model_output.dtype, device=device)
        step(x, m, self._table(), row, self._options(), noise=noise, seed=seed,
             history=(prev,) if second else (), x0_out=new, out=out,
             **(self._noise_index(x, self.config.thresholding) if seed is not None else {}))
        out = out.to(model_output.dtype)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)

"""The drop-in for diffusers' DDIMScheduler: its timestep rule and a DDIM table per (K, eta)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler as _DiffusersDDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from .._ext import C
from ..engine.backend import canonical_device
from ..engine.checks import check_int, check_real
from ..engine.tables import Table
from .common import _VPStepMixin

class DDIMScheduler(_VPStepMixin, _DiffusersDDIMScheduler):
    """diffusers' ``DDIMScheduler`` (Song, Meng & Ermon, 2021) with fastdiff's fused step.

    Same constructor, config and methods as ``diffusers.DDIMScheduler``; see
    fastdiff/dropin/common.py for what differs. Extra: ``set_noise_seed``, ``backend``."""

    # Saved pipelines name the public module as the scheduler's library (diffusers imports it and
    # looks for SchedulerMixin there): keep it stable whatever file the class lives in.
    __module__ = "fastdiff.diffusers"

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        """Timesteps for ``num_inference_steps`` steps by ``config.timestep_spacing`` (diffusers' rules,
        computed by fastdiff._C). With ``device``, the eta = 0 table is uploaded there now."""
        cfg = self.config
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1)
        if num_inference_steps > cfg.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                f" {cfg.num_train_timesteps} as the unet model trained with this scheduler can only handle"
                f" maximal {cfg.num_train_timesteps} timesteps.")
        ts = C.make_timesteps(int(cfg.num_train_timesteps), int(num_inference_steps), str(cfg.timestep_spacing),
                              int(cfg.steps_offset))
        self.num_inference_steps = int(num_inference_steps)
        self._record_timesteps(ts, device)
        if device is not None:
            self._table(0.0).on(canonical_device(device))

    def _table(self, eta: float) -> Table:
        n, k = int(self.config.num_train_timesteps), int(self.num_inference_steps)

        def build():
            ab = self._alphas_cumprod64()
            t = np.arange(n, dtype=np.int64)
            # diffusers' DDIM steps from t to t - N // K whatever the spacing (trailing and linspace
            # timesteps are not N // K apart, and diffusers still steps that far).
            final = 1.0 if self.config.set_alpha_to_one else float(ab[0])
            return C.ddim_table(ab, t, t - n // k, eta, final)

        return self._cached_table(("ddim", n, k, eta), build)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DDIMSchedulerOutput, Tuple]:
        """One DDIM step t -> t - N // K (eq. 12 of the paper) in one fused launch:
        x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - std^2) eps_hat + std z, std = eta sqrt(beta_tilde).

        Arguments and result as diffusers' ``DDIMScheduler.step``. Noise is drawn when eta > 0, as
        diffusers does: ``variance_noise`` if given, else in-kernel Philox after ``set_noise_seed``,
        else ``randn_tensor(model_output.shape, generator=generator, ...)``."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        self._check_inputs(model_output, sample, variance_noise)
        eta = check_real("eta", eta, 0)  # a tensor eta costs a read; pipelines pass a float
        row, _ = self._row(timestep, sample.device)
        noise = seed = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`.")
            noise, seed = self._noise(model_output, sample, generator, variance_noise)
        prev_sample, pred_original_sample = self._fused(
            model_output, sample, self._table(eta), row, noise=noise, seed=seed,
            recompute_eps=bool(use_clipped_model_output))
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

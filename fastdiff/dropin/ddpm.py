"""The drop-in for diffusers' DDPMScheduler: its previous-timestep rule and a DDPM table per
timestep list and variance type (learned variances read the model's second half)."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler as _DiffusersDDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from .._ext import C
from ..engine.backend import canonical_device
from ..engine.checks import check_int, check_int_array
from ..engine.tables import Table
from .common import _VPStepMixin, _version_of

class DDPMScheduler(_VPStepMixin, _DiffusersDDPMScheduler):
    """diffusers' ``DDPMScheduler`` (Ho, Jain & Abbeel, 2020) with fastdiff's fused step.

    Same constructor, config and methods as ``diffusers.DDPMScheduler``; see
    fastdiff/dropin/common.py for what differs. Extra: ``set_noise_seed``, ``backend``, and a
    keyword-only ``variance_noise`` on ``step``."""

    __module__ = "fastdiff.diffusers"  # as DDIMScheduler's

    def set_timesteps(self, num_inference_steps: Optional[int] = None,
                      device: Union[str, torch.device, None] = None, timesteps: Optional[List[int]] = None):
        """Timesteps by ``config.timestep_spacing`` (diffusers' rules, from fastdiff._C), or the
        strictly descending custom ``timesteps``. With ``device``, the table is uploaded there now."""
        cfg = self.config
        n = int(cfg.num_train_timesteps)
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = C.validate_timesteps(check_int_array("timesteps", timesteps), n)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or a list of timesteps")
            num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1)
            if num_inference_steps > n:
                raise ValueError(
                    f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                    f" {n} as the unet model trained with this scheduler can only handle maximal {n} timesteps.")
            self.num_inference_steps = int(num_inference_steps)
            self.custom_timesteps = False
            ts = C.make_timesteps(n, int(num_inference_steps), str(cfg.timestep_spacing), int(cfg.steps_offset))
        self._record_timesteps(ts, device)
        if device is not None:
            self._table().on(canonical_device(device))

    def _schedule_ts(self) -> np.ndarray:
        """The host timesteps the previous-timestep rule reads (all of them before set_timesteps)."""
        st = self._fd
        ts = self.__dict__.get("timesteps")
        if st.ts_obj is None or ts is not st.ts_obj or _version_of(ts) != st.ts_version:
            # Never set by set_timesteps (diffusers' initial arange), replaced by the caller, or
            # edited in place: read it once (a sync if it lives on a GPU; outside any loop in
            # normal use).
            host = np.asarray(ts.detach().cpu().numpy(), dtype=np.int64)
            st.ts_own = st.ts_own and ts is st.ts_obj  # a caller's tensor: no storage-offset reads
            st.host_ts, st.ts_key, st.ts_obj = host, hash(host.tobytes()), ts
            st.ts_version = _version_of(ts)
        return st.host_ts

    def _table(self) -> Table:
        ts = self._schedule_ts()
        n = int(self.config.num_train_timesteps)
        variance_type = str(self.variance_type)
        # diffusers' previous_timestep follows the list only after set_timesteps (or custom ones)
        use_list = bool(getattr(self, "custom_timesteps", False) or getattr(self, "num_inference_steps", None))

        def build():
            # diffusers' previous_timestep: the next timestep of the list (-1 after the last); before
            # set_timesteps the list is every timestep, which makes it t - 1. Rows for timesteps
            # outside the list (diffusers fails on those) step to the next listed one below.
            t = np.arange(n, dtype=np.int64)
            if use_list:
                asc = np.sort(ts)
                j = np.searchsorted(asc, t, side="left") - 1
                prev = np.where(j >= 0, asc[np.maximum(j, 0)], -1).astype(np.int64)
            else:  # diffusers steps t -> t - 1 until set_timesteps (whatever .timesteps holds)
                prev = t - 1
            # fixed_large_log: diffusers takes sqrt(log(beta)) = NaN; the table gives what the name
            # means (GLIDE's max_log: log-variance log(beta), variance beta), i.e. fixed_large.
            return C.ddpm_table(self._alphas_cumprod64(), t, prev, variance_type, 1.0, "t_zero")

        return self._cached_table(("ddpm", n, self._fd.ts_key if use_list else None, variance_type), build)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        *,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> Union[DDPMSchedulerOutput, Tuple]:
        """One ancestral DDPM step t -> previous timestep in one fused launch (eq. 6-7 of the paper):
        x_s = sqrt(ab_s) beta_ts/(1 - ab_t) x0_hat + sqrt(ab_t/ab_s)(1 - ab_s)/(1 - ab_t) x_t + std z.

        Arguments and result as diffusers' ``DDPMScheduler.step``. Learned variances take the
        second half of a 2C-channel ``model_output``. Noise is drawn where t > 0, as diffusers
        does: ``variance_noise`` if given, else in-kernel Philox after ``set_noise_seed``, else
        ``randn_tensor``. A GPU timestep that is not an element of ``self.timesteps`` cannot be
        read without a sync, so then noise is drawn (and multiplied by 0 at t = 0)."""
        self._check_inputs(model_output, sample, variance_noise)
        if sample.dim() < 2:
            raise ValueError("sample must be a tensor of shape (batch, channels, ...)")
        row, host_t = self._row(timestep, sample.device)
        predicted_variance = None
        learned = self.variance_type in ("learned", "learned_range")
        if learned and isinstance(model_output, torch.Tensor) and model_output.dim() >= 2 \
                and model_output.shape[1] == sample.shape[1] * 2:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        draws = host_t is None or host_t > 0
        var_mode, aux = "table", None
        if draws and learned:
            if predicted_variance is None:
                raise ValueError(
                    f"variance_type {self.variance_type!r} needs the model output to have twice the sample's "
                    f"channels (the second half is the variance), got model_output of shape "
                    f"{tuple(model_output.shape)} for a sample of shape {tuple(sample.shape)}")
            var_mode, aux = self.variance_type, predicted_variance
        noise = seed = None
        if draws:
            noise, seed = self._noise(model_output, sample, generator, variance_noise)
        if aux is not None and aux.dtype != torch.promote_types(sample.dtype, model_output.dtype):
            aux = aux.to(torch.promote_types(sample.dtype, model_output.dtype))
        pred_prev_sample, pred_original_sample = self._fused(
            model_output, sample, self._table(), row, noise=noise, seed=seed, var_mode=var_mode, aux=aux)
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def previous_timestep(self, timestep):
        """diffusers' rule (next listed timestep, -1 after the last; t - 1 before set_timesteps),
        from the host copy of the timesteps: no ``nonzero()`` sync."""
        t = self._known_timestep(timestep)
        if t is None:
            t = int(timestep)
        ts = self._schedule_ts()
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1 if isinstance(timestep, (int, np.integer)) else torch.tensor(t - 1)
        where = np.nonzero(ts == t)[0]
        if len(where) == 0:
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps")
        i = int(where[0])
        return torch.tensor(-1) if i == len(ts) - 1 else torch.tensor(int(ts[i + 1]))

"""Samplers: a schedule and a step count become a float64 coefficient table; the loop calls the
model and the fused step, nothing else.

Model convention: ``model(x_t, t) -> output`` where ``t`` is an int64 tensor of shape [batch]
holding the discrete timestep (diffusers' convention) and ``output`` has x_t's shape and is read
as ``prediction_type`` ("epsilon", "v_prediction" or "sample").

Between the first and the last model call the loop does no host sync: timesteps, the step index
and the seed are device tensors, the step reads its coefficients from the device table, and the
noise is drawn inside the kernel.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from ._ext import C
from .kernels import philox
from .kernels.vp_step import PREDICTIONS, vp_step
from .schedule import Schedule, next_timesteps


class Sampler:
    """Base class: holds the schedule, the timesteps and the coefficient table.

    Subclasses define ``_host_table()`` (float64 numpy [K, NCOL]) and may override
    ``_call_model`` / ``_step`` for extra inputs (e.g. a covariance head).
    """

    name = "base"
    uses_noise = True  # whether steps draw noise (DDIM with eta = 0 does not)
    var_mode = "table"

    def __init__(
        self,
        schedule=None,
        steps: Optional[int] = 50,
        *,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
        timesteps: Optional[Sequence[int]] = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        use_clipped_model_output: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        backend: Optional[str] = None,
    ):
        self.schedule = Schedule.coerce(schedule)
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {tuple(PREDICTIONS)}, got {prediction_type!r}")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        if thresholding and not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1], got {dynamic_thresholding_ratio}")
        if thresholding and not sample_max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value}")
        self.prediction_type = prediction_type
        self.timesteps = self.schedule.timesteps(None if timesteps is not None else steps, timestep_spacing,
                                                 steps_offset, timesteps)
        self.steps = len(self.timesteps)
        self.prev_timesteps = next_timesteps(self.timesteps)
        self.clip_range = float(clip_sample_range) if clip_sample else None
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.thresholding = bool(thresholding)
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)
        self.backend = backend
        ab = self.schedule.alphas_cumprod
        if prediction_type == "epsilon" and float(ab[int(self.timesteps[0])]) == 0.0:
            raise ValueError(
                "alpha_bar is 0 at the first timestep (zero terminal SNR), where an epsilon prediction "
                "cannot give x0 (it divides by sqrt(alpha_bar) = 0); use prediction_type='v_prediction' "
                "or a spacing that does not start at the last training step")
        self._device_cache: Dict[torch.device, tuple] = {}

    # -- tables ---------------------------------------------------------------------------
    def _host_table(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def table(self) -> torch.Tensor:
        """The float64 coefficient table [steps, NCOL] (columns: ``fastdiff.COLUMNS``)."""
        return torch.from_numpy(self._host_table())

    def device_state(self, device: torch.device):
        """(table fp32 [K, NCOL], timesteps int64 [K], step ids int32 [K]) on ``device``, cached."""
        device = torch.device(device)
        if device not in self._device_cache:
            table = torch.from_numpy(self._host_table()).to(device=device, dtype=torch.float32)
            ts = torch.from_numpy(np.asarray(self.timesteps, dtype=np.int64)).to(device)
            ids = torch.arange(self.steps, dtype=torch.int32, device=device)
            self._device_cache[device] = (table, ts, ids)
        return self._device_cache[device]

    # -- the loop ---------------------------------------------------------------------------
    def _call_model(self, model, x, t):
        """Returns (model_output, aux) where aux feeds var_mode (None for the table std)."""
        return model(x, t), None

    def _thresholds(self, x, model_output, table, step):
        from .kernels.vp_step import dynamic_thresholds
        return dynamic_thresholds(x, model_output, table, step, self.prediction_type,
                                  self.dynamic_thresholding_ratio, self.sample_max_value)

    def _step(self, x, model_output, aux, table, step, seed, sample_offset):
        thresholds = self._thresholds(x, model_output, table, step) if self.thresholding else None
        vp_step(x, model_output, table, step, prediction_type=self.prediction_type, clip_range=self.clip_range,
                thresholds=thresholds, recompute_eps=self.use_clipped_model_output,
                seed=seed if self.uses_noise else None, sample_offset=sample_offset, var_mode=self.var_mode,
                aux=aux, out=x, backend=self.backend)

    def loop(self, model, x: torch.Tensor, seed: torch.Tensor, *, sample_offset: int = 0,
             progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
        """Run every step in place on ``x`` (the graph runner captures exactly this)."""
        table, ts, ids = self.device_state(x.device)
        batch = x.shape[0]
        steps: Sequence[int] = range(self.steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"fastdiff {self.name}", total=self.steps)
        for i in steps:
            t = ts[i].expand(batch)
            model_output, aux = self._call_model(model, x, t)
            self._step(x, model_output, aux, table, ids[i], seed, sample_offset)
            if callback is not None:
                callback(i, t, x)
        return x

    def sample(self, model, shape: Optional[Sequence[int]] = None, *, x: Optional[torch.Tensor] = None,
               seed: int = 0, sample_offset: int = 0, device=None, dtype: torch.dtype = torch.float32,
               progress: bool = False, callback: Optional[Callable] = None,
               cuda_graph: bool = False) -> torch.Tensor:
        """Draw samples. Either ``shape`` (initial noise drawn from ``seed``) or ``x`` (x_T given).

        ``sample_offset`` is the global index of the first sample of this batch: a batch split
        into calls with matching offsets gives exactly the samples of one call.
        ``callback(i, t, x)`` runs after each step (it must not sync the host to stay fast).
        ``cuda_graph=True`` captures the whole loop in one CUDA graph on first use and replays it
        afterwards (fastdiff.graphs); on a non-CUDA device it runs eagerly with one warning.
        """
        shape, device, dtype = check_sample_args(shape, x, seed, sample_offset, device, dtype)
        if cuda_graph:
            from .graphs import sample_graphed
            return sample_graphed(self, model, shape, x=x, seed=seed, sample_offset=sample_offset, device=device,
                                  dtype=dtype, progress=progress, callback=callback)
        seed_t = torch.tensor([int(seed)], dtype=torch.int64, device=device)
        if x is None:
            per_sample = math.prod(shape[1:])
            x = philox.randn(shape, seed_t, stream=philox.STREAM_INIT, index_offset=sample_offset * per_sample,
                             device=device, dtype=dtype, backend=self.backend)
        else:
            x = x.clone(memory_format=torch.contiguous_format)
        return self.loop(model, x, seed_t, sample_offset=sample_offset, progress=progress, callback=callback)

    __call__ = sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, prediction_type={self.prediction_type!r}, {self.schedule})"


def check_sample_args(shape, x, seed, sample_offset, device, dtype):
    """Validate the arguments of ``Sampler.sample``; returns (shape, device, dtype) of x_T."""
    if x is None:
        if shape is None:
            raise ValueError("give shape (to draw x_T from the seed) or x (x_T itself)")
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
        device = torch.device(device) if device is not None else torch.device("cpu")
    else:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError("x must be a tensor with a batch dimension")
        if shape is not None and tuple(shape) != tuple(x.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x's shape {tuple(x.shape)}")
        device, dtype = x.device, x.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if sample_offset < 0:
        raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    return (tuple(x.shape) if x is not None else shape), device, dtype


class DDIMSampler(Sampler):
    """DDIM (Song, Meng & Ermon, 2021, eq. 12) with stochasticity eta:
    x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - lambda^2) eps_hat + lambda z,
    lambda^2 = eta^2 (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s). eta = 0 is deterministic, eta = 1
    has DDPM's fixed_small variance.

    ``set_alpha_to_one`` (default) makes the final step land on alpha_bar = 1; otherwise on
    alpha_bar at timestep 0. ``prev_timestep_rule`` "next" steps to the next listed timestep;
    "ratio" steps to t - num_train_timesteps // steps as diffusers' DDIMScheduler does.
    """

    name = "ddim"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, eta: float = 0.0, set_alpha_to_one: bool = True,
                 prev_timestep_rule: str = "next", **kw):
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if prev_timestep_rule not in ("next", "ratio"):
            raise ValueError(f"prev_timestep_rule must be 'next' or 'ratio', got {prev_timestep_rule!r}")
        super().__init__(schedule, steps, **kw)
        self.eta = float(eta)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        if prev_timestep_rule == "ratio":
            self.prev_timesteps = self.timesteps - self.schedule.num_train_timesteps // self.steps
        self.uses_noise = self.eta > 0

    def _final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.schedule.alphas_cumprod[0])

    def _host_table(self) -> np.ndarray:
        return C.ddim_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.eta, self._final_alpha_cumprod())


class DDPMSampler(Sampler):
    """DDPM ancestral sampling (Ho, Jain & Abbeel, 2020) on any timestep subsequence:
    x_s = sqrt(ab_s) beta_{t|s}/(1 - ab_t) x0_hat + sqrt(ab_t/ab_s) (1 - ab_s)/(1 - ab_t) x_t + sqrt(v) z
    with v = beta_tilde ("fixed_small") or beta_{t|s} ("fixed_large"); no noise on the last step.
    """

    name = "ddpm"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, variance_type: str = "fixed_small", **kw):
        if variance_type not in ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log"):
            raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large' (or their _log names) for "
                             f"DDPMSampler, got {variance_type!r}; learned variances need the model's "
                             "variance output (fastdiff.diffusers.DDPMScheduler)")
        super().__init__(schedule, steps, **kw)
        self.variance_type = variance_type

    def _host_table(self) -> np.ndarray:
        return C.ddpm_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.variance_type, 1.0, "last")


SAMPLERS: Dict[str, type] = {"ddim": DDIMSampler, "ddpm": DDPMSampler}


def register_sampler(name: str, cls: type) -> None:
    """Make ``cls`` available to ``fastdiff.sample(sampler=name)``."""
    SAMPLERS[name] = cls


def make_sampler(sampler: str = "ddim", schedule=None, steps: Optional[int] = 50, **kw) -> Sampler:
    if isinstance(sampler, Sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler](schedule, steps, **kw)


def sample(model, shape: Optional[Sequence[int]] = None, *, sampler: str = "ddim", steps: Optional[int] = 50,
           seed: int = 0, schedule=None, x: Optional[torch.Tensor] = None, sample_offset: int = 0, device=None,
           dtype: torch.dtype = torch.float32, progress: bool = False, callback: Optional[Callable] = None,
           cuda_graph: bool = False, **sampler_kwargs) -> torch.Tensor:
    """Sample from ``model`` in one call, e.g.
    ``fastdiff.sample(model, (4, 3, 32, 32), sampler="ddim", steps=50, eta=0.0, seed=0)``.
    Keyword arguments beyond the loop's go to the sampler (eta, prediction_type,
    timestep_spacing, clip_sample, variance_type, ...). ``cuda_graph=True`` replays the loop as
    one CUDA graph, captured once per (model, sampler config, shape, dtype, device)."""
    s = make_sampler(sampler, schedule, steps, **sampler_kwargs)
    return s.sample(model, shape, x=x, seed=seed, sample_offset=sample_offset, device=device, dtype=dtype,
                    progress=progress, callback=callback, cuda_graph=cuda_graph)

"""Noise schedules, computed in float64 by fastdiff._C: the discrete VP schedule (betas, alpha_bar,
timestep selection) and the rectified-flow schedule (sigmas)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .._ext import C
from .checks import check_int, check_int_array, check_real
from .sigmas import calculate_shift, flow_sigmas

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")
# Training timesteps: far above any schedule in use (1000, 4000), and low enough that the
# per-timestep tables of the drop-ins ([N, NCOL] float64) stay small.
MAX_TRAIN_TIMESTEPS = 2**20


class Schedule:
    """A discrete VP noise schedule over ``num_train_timesteps`` training steps.

    ``beta_schedule``: "linear" (Ho et al.), "scaled_linear" (Stable Diffusion), "squaredcos_cap_v2"
    / "cosine" (Nichol & Dhariwal), "sigmoid"; or ``trained_betas`` (explicit betas in (0, 1)).
    ``rescale_betas_zero_snr`` applies Lin et al. (2024) so that alpha_bar at the last step is 0.

    Attributes are float64 torch tensors on the CPU: ``betas``, ``alphas_cumprod`` (alpha_bar).
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas: Optional[Sequence[float]] = None,
        rescale_betas_zero_snr: bool = False,
    ):
        if trained_betas is not None:
            betas = np.asarray(
                trained_betas.detach().cpu().double().numpy() if isinstance(trained_betas, torch.Tensor)
                else trained_betas, dtype=np.float64)
            if betas.ndim == 1 and betas.shape[0] > MAX_TRAIN_TIMESTEPS:
                raise ValueError(f"trained_betas may hold at most 2**20 values (training timesteps), got "
                                 f"{betas.shape[0]}")
            betas = C.validate_betas(betas)
            num_train_timesteps = int(betas.shape[0])
            beta_schedule = "trained"
        else:
            num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
            beta_start = check_real("beta_start", beta_start)
            beta_end = check_real("beta_end", beta_end)
            if not isinstance(beta_schedule, str):
                raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
            betas = C.make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = C.rescale_zero_terminal_snr(betas)
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.betas = torch.from_numpy(np.asarray(betas))
        self.alphas_cumprod = torch.from_numpy(C.alphas_cumprod(betas))
        self._on_device: dict = {}

    def alphas_cumprod_on(self, device) -> torch.Tensor:
        """alpha_bar (float64) on ``device``, copied once and cached: per-step gathers from it then
        need no host-to-device copy (a blocking copy syncs the stream and breaks graph capture)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.to(device)
        return self._on_device[device]

    @classmethod
    def coerce(cls, schedule) -> "Schedule":
        """A Schedule from a Schedule, a schedule name, a dict of keyword arguments, or None (linear)."""
        if isinstance(schedule, str):
            return cls(beta_schedule=schedule)
        return _coerce(cls, schedule, "a Schedule, a schedule name or a dict")

    def timesteps(self, steps: Optional[int] = None, spacing: str = "leading", steps_offset: int = 0,
                  timesteps: Optional[Sequence[int]] = None) -> np.ndarray:
        """Descending int64 timesteps: ``steps`` chosen by ``spacing`` (diffusers' rules, leading
        adds ``steps_offset``), or an explicit strictly descending list ``timesteps``."""
        n = self.num_train_timesteps
        if timesteps is not None:
            ts = check_int_array("timesteps", timesteps)
            if steps is not None and steps != len(ts):
                raise ValueError(f"give steps or timesteps, not both (steps={steps}, {len(ts)} timesteps)")
            return C.validate_timesteps(ts, n)
        if steps is None:
            raise ValueError("steps (the number of sampling steps) or an explicit timesteps list is required")
        steps = check_int("steps", steps, 1)
        if steps > n:
            raise ValueError(f"the number of sampling steps ({steps}) must not exceed num_train_timesteps ({n})")
        if spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
        steps_offset = check_int("steps_offset", steps_offset, 0, n, hi_open=True)
        return C.make_timesteps(n, steps, spacing, steps_offset)

    def __repr__(self) -> str:
        return (f"Schedule({self.beta_schedule!r}, num_train_timesteps={self.num_train_timesteps}, "
                f"zero_snr={self.rescale_betas_zero_snr})")


def next_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """The timestep each step goes to: the next one in the list, -1 after the last."""
    return np.append(np.asarray(timesteps[1:], dtype=np.int64), np.int64(-1))


class FlowSchedule:
    """A rectified-flow schedule, x_t = (1 - sigma) x0 + sigma eps (SD3, Flux, Wan, LTX, ...), with
    the sigma rules of diffusers' ``FlowMatchEulerDiscreteScheduler`` (computed in float64 by
    fastdiff._C): ``shift`` (sigma' = s sigma / (1 + (s - 1) sigma)), dynamic shifting by ``mu``
    (``time_shift_type`` "exponential" or "linear"; mu from the image sequence length through
    ``base_shift`` / ``max_shift`` / ``base_image_seq_len`` / ``max_image_seq_len`` as the pipelines
    compute it), ``shift_terminal``, Karras / exponential / beta spacing of the sigmas. The model
    is called with t = sigma * num_train_timesteps (diffusers' timesteps)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, *, use_dynamic_shifting: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False):
        self.num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        self.shift = check_real("shift", shift, 0, lo_open=True)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = check_real("base_shift", base_shift), check_real("max_shift", max_shift)
        self.base_image_seq_len = check_int("base_image_seq_len", base_image_seq_len, 1)
        self.max_image_seq_len = check_int("max_image_seq_len", max_image_seq_len, 1)
        self.time_shift_type = str(time_shift_type)
        self.shift_terminal = None if shift_terminal is None else check_real("shift_terminal", shift_terminal)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.use_exponential_sigmas = bool(use_exponential_sigmas)
        self.use_beta_sigmas = bool(use_beta_sigmas)
        # Validated here, once: a bad configuration fails at construction, not at the first sample.
        self.sigmas(2, mu=0.0 if self.use_dynamic_shifting else None)

    @classmethod
    def coerce(cls, schedule) -> "FlowSchedule":
        """A FlowSchedule from a FlowSchedule, a dict of keyword arguments, or None (defaults)."""
        return _coerce(cls, schedule, "a FlowSchedule or a dict", what="a flow schedule")

    def mu(self, image_seq_len: int) -> float:
        """mu for an image of ``image_seq_len`` latent tokens (the pipelines' calculate_shift)."""
        return calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                               self.max_shift)

    def sigmas(self, steps: Optional[int] = None, *, mu: Optional[float] = None, image_seq_len=None,
               sigmas: Optional[Sequence[float]] = None, timesteps: Optional[Sequence[float]] = None):
        """(sigmas [K + 1] ending in 0, timesteps [K] = sigma * N), float64, for ``steps`` steps or
        an explicit ``sigmas`` / ``timesteps`` list. With dynamic shifting, give ``mu`` or
        ``image_seq_len``."""
        if image_seq_len is not None:
            if mu is not None:
                raise ValueError("give mu or image_seq_len, not both")
            mu = self.mu(check_int("image_seq_len", image_seq_len, 1))
        elif mu is not None:
            mu = check_real("mu", mu)
        if steps is not None:
            steps = check_int("steps", steps, 1, 2**20)
        if mu is not None and not self.use_dynamic_shifting:
            raise ValueError("mu (or image_seq_len) applies with use_dynamic_shifting=True only")
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu or image_seq_len")
        return flow_sigmas(steps, num_train_timesteps=self.num_train_timesteps, shift=self.shift,
                           use_dynamic_shifting=self.use_dynamic_shifting, mu=mu, time_shift_type=self.time_shift_type,
                           shift_terminal=self.shift_terminal, use_karras_sigmas=self.use_karras_sigmas,
                           use_exponential_sigmas=self.use_exponential_sigmas, use_beta_sigmas=self.use_beta_sigmas,
                           sigmas=sigmas, timesteps=timesteps)

    def __repr__(self) -> str:
        return (f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, shift={self.shift}, "
                f"dynamic={self.use_dynamic_shifting})")


def _coerce(cls, schedule, accepted: str, what: str = "schedule"):
    """``schedule`` as a ``cls``: itself, ``cls(**dict)``, or ``cls()`` for None."""
    if schedule is None:
        return cls()
    if isinstance(schedule, cls):
        return schedule
    if isinstance(schedule, dict):
        return cls(**schedule)
    raise TypeError(f"{what} must be {accepted}, got {type(schedule).__name__}")

"""Noise schedules, computed in float64 by fastdiff._C: the discrete VP schedule (betas, alpha_bar,
timestep selection) and the rectified-flow schedule (sigmas)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .._ext import C
from .sigmas import calculate_shift, flow_sigmas

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")


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
            betas = C.validate_betas(betas)
            num_train_timesteps = int(betas.shape[0])
            beta_schedule = "trained"
        else:
            if not isinstance(num_train_timesteps, (int, np.integer)) or isinstance(num_train_timesteps, bool):
                raise ValueError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
            betas = C.make_betas(str(beta_schedule), int(num_train_timesteps), float(beta_start), float(beta_end))
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
        if schedule is None:
            return cls()
        if isinstance(schedule, Schedule):
            return schedule
        if isinstance(schedule, str):
            return cls(beta_schedule=schedule)
        if isinstance(schedule, dict):
            return cls(**schedule)
        raise TypeError(f"schedule must be a Schedule, a schedule name or a dict, got {type(schedule).__name__}")

    def timesteps(self, steps: Optional[int] = None, spacing: str = "leading", steps_offset: int = 0,
                  timesteps: Optional[Sequence[int]] = None) -> np.ndarray:
        """Descending int64 timesteps: ``steps`` chosen by ``spacing`` (diffusers' rules, leading
        adds ``steps_offset``), or an explicit strictly descending list ``timesteps``."""
        if timesteps is not None:
            if steps is not None and steps != len(timesteps):
                raise ValueError(f"give steps or timesteps, not both (steps={steps}, {len(timesteps)} timesteps)")
            return C.validate_timesteps(np.asarray(timesteps, dtype=np.int64), self.num_train_timesteps)
        if steps is None:
            raise ValueError("steps (the number of sampling steps) or an explicit timesteps list is required")
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
            raise ValueError(f"steps must be an int, got {steps!r}")
        return C.make_timesteps(self.num_train_timesteps, int(steps), str(spacing), int(steps_offset))

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
        if not isinstance(num_train_timesteps, (int, np.integer)) or isinstance(num_train_timesteps, bool) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.use_dynamic_shifting = bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.time_shift_type = str(time_shift_type)
        self.shift_terminal = None if shift_terminal is None else float(shift_terminal)
        self.use_karras_sigmas = bool(use_karras_sigmas)
        self.use_exponential_sigmas = bool(use_exponential_sigmas)
        self.use_beta_sigmas = bool(use_beta_sigmas)
        # Validated here, once: a bad configuration fails at construction, not at the first sample.
        self.sigmas(2, mu=0.0 if self.use_dynamic_shifting else None)

    @classmethod
    def coerce(cls, schedule) -> "FlowSchedule":
        """A FlowSchedule from a FlowSchedule, a dict of keyword arguments, or None (defaults)."""
        if schedule is None:
            return cls()
        if isinstance(schedule, FlowSchedule):
            return schedule
        if isinstance(schedule, dict):
            return cls(**schedule)
        raise TypeError(f"a flow schedule must be a FlowSchedule or a dict, got {type(schedule).__name__}")

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
            mu = self.mu(image_seq_len)
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

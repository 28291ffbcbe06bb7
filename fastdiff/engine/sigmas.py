"""Sigma and timestep sequences of diffusers' schedulers, in float64 (fastdiff._C).

One function per ``set_timesteps`` rule of diffusers 0.42.1:

* flow matching (``FlowMatchEulerDiscreteScheduler``, x_t = (1 - sigma) x0 + sigma eps):
  :func:`flow_sigmas`, :func:`flow_train_sigmas`, :func:`calculate_shift`;
* sigma space (``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, x_t = x0 + sigma eps):
  :func:`euler_sigmas`, :func:`euler_ancestral_sigmas`, :func:`euler_init_noise_sigma`;
* VP multistep (``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``): :func:`dpm_sigmas`,
  :func:`unipc_sigmas`, :func:`alpha_sigma_lambda`;
* shared: :func:`vp_table`, :func:`index_for_timestep`, :func:`beta_ppf`.

The contract: every float array returned, cast to float32, equals the tensor diffusers holds after
the same ``set_timesteps`` call (``scheduler.sigmas`` with the terminal value appended where
diffusers appends it, ``scheduler.timesteps``); integer timesteps are int64 as diffusers has them.
The values keep float64 precision where diffusers' last step before its cast is float64.

The VP functions take ``alphas_cumprod``. Given diffusers' own float32 ``alphas_cumprod`` (what a
drop-in holds), they reproduce diffusers' float32 training table with torch and numpy themselves:
torch's float32 sqrt and numpy's float32 log are SIMD approximations that are not correctly
rounded (17% and 4.4% of values differ from IEEE in the last bit on an AVX-512 CPU), and the
interpolation in ``_sigma_to_t`` turns one last-bit change of a log sigma into up to ~5e-5 of a
timestep. Given float64 ``alphas_cumprod`` (fastdiff's own schedules) everything is float64,
without diffusers' intermediate float32 roundings.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .._ext import C
from .checks import check_int

__all__ = [
    "VPTable", "alpha_sigma_lambda", "beta_ppf", "calculate_shift", "dpm_sigmas", "euler_ancestral_sigmas",
    "euler_init_noise_sigma", "euler_sigmas", "flow_sigmas", "flow_train_sigmas", "index_for_timestep",
    "unipc_sigmas", "vp_table",
]

SPACINGS = ("linspace", "leading", "trailing")


def _f64(x, name: str) -> Optional[np.ndarray]:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    return a


def _steps(n) -> Optional[int]:
    if n is None:
        return None
    return check_int("num_inference_steps", n, 1, 2**20)


def _is_float32(x) -> bool:
    return (isinstance(x, torch.Tensor) and x.dtype == torch.float32) or (
        isinstance(x, np.ndarray) and x.dtype == np.float32)


class VPTable(NamedTuple):
    """A VP schedule's training steps as the multistep and Euler rules read them."""
    sigmas: np.ndarray   # sqrt((1 - ab_t) / ab_t) for t = 0 .. N-1
    log_sigmas: np.ndarray
    lambdas: np.ndarray  # lambda_t = log sqrt(ab_t) - log sqrt(1 - ab_t)
    final_sigma: float   # sigma of ab_0, for final_sigmas_type "sigma_min"
    float32: bool        # the values are diffusers' float32 ones


def vp_table(alphas_cumprod) -> VPTable:
    """The training table of ``alphas_cumprod`` (1-D, values in (0, 1)).

    float32 input (diffusers' own ``alphas_cumprod``): the values diffusers computes, by the same
    torch and numpy float32 operations (see the module docstring); float64: computed in C++.
    """
    if not _is_float32(alphas_cumprod):
        s, ls, lam, final = C.vp_train_table(_f64(alphas_cumprod, "alphas_cumprod"))
        return VPTable(s, ls, lam, float(final), False)
    ab = torch.as_tensor(alphas_cumprod).detach().to("cpu")
    if ab.ndim != 1 or ab.numel() < 2:
        raise ValueError(f"alphas_cumprod must be one-dimensional with at least 2 entries, got shape {tuple(ab.shape)}")
    bad = ~((ab > 0) & (ab < 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError("alphas_cumprod must lie in the open interval (0, 1), got "
                         f"alphas_cumprod[{i}] = {float(ab[i])}")
    sigmas = ((1 - ab) / ab) ** 0.5
    lambdas = torch.log(torch.sqrt(ab)) - torch.log(torch.sqrt(1 - ab))
    final = ((1 - ab[0]) / ab[0]) ** 0.5
    s32 = sigmas.numpy()
    return VPTable(s32.astype(np.float64), np.log(s32).astype(np.float64), lambdas.numpy().astype(np.float64),
                   float(final), True)


# --- flow matching ---------------------------------------------------------------------------

def calculate_shift(image_seq_len, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu for dynamic shifting: linear in the image sequence length through (base_seq_len,
    base_shift) and (max_seq_len, max_shift), as the Flux / SD3 / ... pipelines compute it."""
    return C.calculate_shift(float(image_seq_len), float(base_seq_len), float(max_seq_len), float(base_shift),
                             float(max_shift))


def flow_train_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0,
                      use_dynamic_shifting: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) a FlowMatchEulerDiscreteScheduler holds after ``__init__``: sigma = t/N
    for t = N..1, shifted by ``shift`` unless use_dynamic_shifting, in float32. ``sigmas[0]`` and
    ``sigmas[-1]`` are its ``sigma_max`` and ``sigma_min``; scale_noise before set_timesteps reads them."""
    return C.flow_train_sigmas(int(num_train_timesteps), float(shift), bool(use_dynamic_shifting))


def flow_sigmas(num_inference_steps: Optional[int] = None, *, num_train_timesteps: int = 1000, shift: float = 1.0,
                use_dynamic_shifting: bool = False, mu: Optional[float] = None,
                time_shift_type: str = "exponential", shift_terminal: Optional[float] = None,
                use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                invert_sigmas: bool = False, sigmas: Optional[Sequence[float]] = None,
                timesteps: Optional[Sequence[float]] = None, sigma_min: Optional[float] = None,
                sigma_max: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler.set_timesteps: (sigmas + [0] (or [1] with invert_sigmas),
    timesteps), both float64 of length n + 1 and n.

    Keyword arguments are the scheduler's config; ``shift`` is its current shift (``set_shift``).
    ``sigma_min`` / ``sigma_max`` default to the ends of :func:`flow_train_sigmas` with the same
    shift (give them when the config shift differs from the current one). Raises ValueError naming
    the constraint for any invalid input, including ``mu`` without use_dynamic_shifting (which
    diffusers ignores: a drop-in serving a pipeline that always passes mu should drop it there).
    """
    return C.flow_sigmas(int(num_train_timesteps), _steps(num_inference_steps), float(shift),
                         bool(use_dynamic_shifting), None if mu is None else float(mu), str(time_shift_type),
                         None if shift_terminal is None else float(shift_terminal), bool(use_karras_sigmas),
                         bool(use_exponential_sigmas), bool(use_beta_sigmas), bool(invert_sigmas),
                         _f64(sigmas, "sigmas"), _f64(timesteps, "timesteps"),
                         None if sigma_min is None else float(sigma_min),
                         None if sigma_max is None else float(sigma_max))


def index_for_timestep(timesteps, timestep) -> int:
    """Where ``timestep`` sits in ``timesteps`` (the second occurrence if it repeats), as diffusers'
    index_for_timestep; scale_noise takes ``sigmas[index]``. Compare float32 values with float32
    values: diffusers' timesteps are a float32 tensor."""
    if isinstance(timestep, torch.Tensor):
        timestep = timestep.item()
    return C.index_for_timestep(_f64(timesteps, "timesteps"), float(timestep))


# --- sigma space: Euler ------------------------------------------------------------------------

def _continuous_v(timestep_type: str, prediction_type: str) -> bool:
    if timestep_type not in ("discrete", "continuous"):
        raise ValueError(f"unknown timestep_type '{timestep_type}': expected 'discrete' or 'continuous'")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type '{prediction_type}': expected 'epsilon', 'v_prediction' or 'sample'")
    return timestep_type == "continuous" and prediction_type == "v_prediction"


def euler_sigmas(alphas_cumprod, num_inference_steps: Optional[int] = None, *, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                 final_sigmas_type: str = "zero", timestep_type: str = "discrete", prediction_type: str = "epsilon",
                 timesteps: Optional[Sequence[float]] = None,
                 sigmas: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """EulerDiscreteScheduler.set_timesteps: (sigmas + [final sigma], timesteps), float64.

    Give exactly one of num_inference_steps, ``timesteps`` or ``sigmas`` (a list that already ends
    with its final sigma: n + 1 values for n steps, returned as given, in float32 like diffusers).
    With timestep_type "continuous" and v_prediction the timesteps are log(sigma) / 4.
    """
    tb = vp_table(alphas_cumprod)
    continuous_v = _continuous_v(timestep_type, prediction_type)
    if sum(x is not None for x in (num_inference_steps, timesteps, sigmas)) != 1:
        raise ValueError("give exactly one of num_inference_steps, timesteps or sigmas")
    if sigmas is not None:
        s = _f64(sigmas, "sigmas")
        with np.errstate(all="ignore"):  # C++ names a negative or non-finite sigma
            # numpy's log, in float32 as diffusers' _sigma_to_t on its float32 list
            ls = (np.log(np.maximum(s.astype(np.float32), np.float32(1e-10))).astype(np.float64) if tb.float32
                  else np.log(np.maximum(s, 1e-10)))
        s, t = C.euler_sigmas_from_list(s, ls, tb.sigmas, tb.log_sigmas, tb.float32)
    else:
        if timesteps is not None and continuous_v:
            raise ValueError("timesteps cannot be given with timestep_type 'continuous' and v_prediction")
        timesteps = _f64(timesteps, "timesteps")
        n = _steps(num_inference_steps)
        log_linear = None
        if interpolation_type == "log_linear" and tb.float32:
            k = n if timesteps is None else len(timesteps)
            if k is not None and k >= 1:
                # diffusers: torch.linspace(log sigma_max, log sigma_min, n + 1).exp(), torch's float32 exp
                log_linear = torch.linspace(float(tb.log_sigmas[-1]), float(tb.log_sigmas[0]), k + 1).exp()
                log_linear = log_linear.numpy().astype(np.float64)
        s, t = C.euler_sigmas(tb.sigmas, tb.log_sigmas, tb.final_sigma, tb.float32, n, str(timestep_spacing),
                              int(steps_offset), str(interpolation_type), bool(use_karras_sigmas),
                              bool(use_exponential_sigmas), bool(use_beta_sigmas),
                              None if sigma_min is None else float(sigma_min),
                              None if sigma_max is None else float(sigma_max), str(final_sigmas_type), timesteps,
                              log_linear)
    if continuous_v:
        if tb.float32:  # diffusers: 0.25 * sigma.log() per float32 sigma (torch's float32 log)
            t = np.array([float(0.25 * x.log()) for x in torch.from_numpy(s[:-1].astype(np.float32))])
        else:
            t = 0.25 * np.log(s[:-1])
    return s, t


def euler_ancestral_sigmas(alphas_cumprod, num_inference_steps: int, *, timestep_spacing: str = "linspace",
                           steps_offset: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """EulerAncestralDiscreteScheduler.set_timesteps: (sigmas + [0], timesteps), float64."""
    return euler_sigmas(alphas_cumprod, num_inference_steps, timestep_spacing=timestep_spacing,
                        steps_offset=steps_offset)


def euler_init_noise_sigma(sigmas, timestep_spacing: str) -> float:
    """The Euler schedulers' init_noise_sigma: max sigma for "linspace" / "trailing" spacing,
    sqrt(max sigma^2 + 1) for "leading". A float32 ``sigmas`` (diffusers' own) is computed with
    torch's float32 ops as diffusers does; float64 in float64 (within an ulp of it after a cast)."""
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing '{timestep_spacing}': expected one of {SPACINGS}")
    if _is_float32(sigmas):
        m = torch.as_tensor(sigmas).max()
        return float(m if timestep_spacing != "leading" else (m ** 2 + 1) ** 0.5)
    m = float(np.max(_f64(sigmas, "sigmas")))
    return m if timestep_spacing != "leading" else math.sqrt(m * m + 1.0)


# --- VP multistep: DPM-Solver, UniPC -------------------------------------------------------------

def dpm_sigmas(alphas_cumprod, num_inference_steps: Optional[int] = None, *, timestep_spacing: str = "linspace",
               steps_offset: int = 0, lambda_min_clipped: float = -math.inf, use_karras_sigmas: bool = False,
               use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
               use_flow_sigmas: bool = False, flow_shift: float = 1.0, use_dynamic_shifting: bool = False,
               time_shift_type: str = "exponential", mu: Optional[float] = None, final_sigmas_type: str = "zero",
               beta_schedule: str = "linear",
               timesteps: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler.set_timesteps: (sigmas + [final sigma] float64, timesteps int64).

    diffusers' precedence among the sigma options holds: karras, lu, exponential, beta, flow.
    ``beta_schedule`` matters only as diffusers reads it: with "squaredcos_cap_v2" the karras / lu
    timesteps are truncated, not rounded. ``mu`` sets flow_shift = exp(mu) with numpy's exp, as
    diffusers does (it differs from libm's in the last bit for ~5% of arguments on AVX-512; that bit
    could only show after the float32 cast or the int truncation near a tie: in 3000 random mu it
    never did).
    """
    if mu is not None:
        if not (use_dynamic_shifting and time_shift_type == "exponential"):
            raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type 'exponential', got "
                             f"use_dynamic_shifting={use_dynamic_shifting}, time_shift_type '{time_shift_type}'")
        if not math.isfinite(mu):
            raise ValueError(f"mu must be finite, got {mu}")
        flow_shift = float(np.exp(mu))
    tb = vp_table(alphas_cumprod)
    t = None if timesteps is None else np.asarray(timesteps).astype(np.int64)
    return C.dpm_sigmas(tb.sigmas, tb.log_sigmas, tb.lambdas, tb.final_sigma, tb.float32, _steps(num_inference_steps),
                        str(timestep_spacing), int(steps_offset), float(lambda_min_clipped), bool(use_karras_sigmas),
                        bool(use_exponential_sigmas), bool(use_beta_sigmas), bool(use_lu_lambdas),
                        bool(use_flow_sigmas), float(flow_shift), str(final_sigmas_type),
                        beta_schedule != "squaredcos_cap_v2", t)


def unipc_sigmas(alphas_cumprod, num_inference_steps: Optional[int] = None, *, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 use_dynamic_shifting: bool = False, mu: Optional[float] = None,
                 time_shift_type: str = "exponential", shift_terminal: Optional[float] = None,
                 final_sigmas_type: str = "zero", sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None,
                 sigmas: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """UniPCMultistepScheduler.set_timesteps: (sigmas + [final sigma] float64, timesteps int64).

    ``sigmas`` (flow sigmas, with use_flow_sigmas only) is read as float64; diffusers itself needs
    an ndarray there (a list fails in its shift arithmetic)."""
    tb = vp_table(alphas_cumprod)
    return C.unipc_sigmas(tb.sigmas, tb.log_sigmas, tb.final_sigma, tb.float32, _steps(num_inference_steps),
                          str(timestep_spacing), int(steps_offset), bool(use_karras_sigmas),
                          bool(use_exponential_sigmas), bool(use_beta_sigmas), bool(use_flow_sigmas),
                          float(flow_shift), bool(use_dynamic_shifting), None if mu is None else float(mu),
                          str(time_shift_type), None if shift_terminal is None else float(shift_terminal),
                          str(final_sigmas_type), None if sigma_min is None else float(sigma_min),
                          None if sigma_max is None else float(sigma_max), _f64(sigmas, "sigmas"))


def alpha_sigma_lambda(sigmas, flow: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t, lambda_t) of each sigma, float64, as DPM-Solver / UniPC derive them
    (_sigma_to_alpha_sigma_t): VP alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; flow
    (use_flow_sigmas) alpha_t = 1 - sigma, sigma_t = sigma; lambda_t = log alpha_t - log sigma_t."""
    return C.alpha_sigma_lambda(_f64(sigmas, "sigmas"), bool(flow))


def beta_ppf(p, a: float, b: float) -> np.ndarray:
    """x with I_x(a, b) = p, the inverse of the regularized incomplete beta function
    (scipy.stats.beta.ppf), elementwise over ``p``; float64, ~1e-15 relative."""
    arr = np.asarray(p, dtype=np.float64)
    return C.beta_ppf(arr.ravel(), float(a), float(b)).reshape(arr.shape)

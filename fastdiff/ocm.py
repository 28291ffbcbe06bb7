"""OCM: covariance-aware sampling with a diagonal posterior covariance (Ou et al., 2024,
"Improving Probabilistic Diffusion Models With Optimal Covariance Matching"; code J-zin/OCM_DPM).

A head h_phi(x_t, t) predicts h = sigma_t^2 diag nabla^2 log p_t(x_t). By the second-order
Tweedie identity the diagonal of Cov[x0|x_t] is Sigma0 = (sigma_t^2 / ab_t)(1 + h). The
reverse step keeps the DDPM / DDIM mean and adds the uncertainty of x0_hat, per element:

    OCM-DDPM:  Var = beta_tilde + (sqrt(ab_s) beta_{t|s} / sigma_t^2)^2 Sigma0
    OCM-DDIM:  Var = lambda^2 + (sqrt(ab_s) - sqrt(sigma_s^2 - lambda^2) sqrt(ab_t) / sigma_t)^2 Sigma0

The coefficient of Sigma0 is the derivative of x_s with respect to x0_hat at fixed x_t (the
table's ``c_cov`` column), so both are the core kernel's ``var_mode="ocm"``:
Var = min(std^2 + c_cov^2 clamp(cov_scale (1 + h), 0, cov_max), var_max), times the table's
``noise`` flag (0 on the final step, which returns the mean).

Head convention. An OCM sampler gets h in one of two ways:
  * ``head=callable(x_t, t) -> h`` given to the sampler (the exact test-bed head
    ``GaussianMixture.head()``, a trained ``nn.Module``, or ``ProbeHead`` for the training-free
    estimate); the model returns its usual output;
  * ``head=None``: the model returns ``(output, h)`` (a network with two output heads).
h has x_t's shape; it is cast to x_t's dtype.

Training (the eps network frozen): with a Rademacher probe v and the score s = -eps/sigma_t,
one vector-Jacobian product gives Hv = nabla_x <s, v>, and sigma_t^2 (v * Hv) is an unbiased
estimate of h (E[v v^T] = I). ``ocm_target`` computes it, ``ocm_loss`` regresses a head on
it, ``train_head`` runs the loop.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ._ext import C
from .kernels.vp_step import vp_step
from .samplers import DDIMSampler, DDPMSampler, register_sampler
from .schedule import Schedule

__all__ = ["OCMDDPMSampler", "OCMDDIMSampler", "ProbeHead", "MLPHead", "ocm_target", "ocm_loss", "train_head",
           "second_to_last_var_cap"]


def second_to_last_var_cap(clip_pixels: float) -> float:
    """Analytic-DPM's variance clip (Bao et al., 2022; also used by the OCM code): at the
    second-to-last step the noise variance is capped at (clip_pixels * 2/255 * sqrt(pi/2))^2, so
    the mean absolute noise sigma * sqrt(2/pi) is at most ``clip_pixels`` widths of an 8-bit
    pixel on data in [-1, 1] (their default: 2). Computed by fastdiff._C, which applies it."""
    return C.second_to_last_var_cap(float(clip_pixels))


class _OCMMixin:
    """Shared part of the OCM samplers: head plumbing, Sigma0 clamping, the table edits."""

    var_mode = "ocm"

    def _ocm_init(self, head, cov_max, clip_pixels):
        if head is not None and not callable(head):
            raise TypeError(f"head must be a callable (x_t, t) -> h or None, got {type(head).__name__}")
        if cov_max is None:
            cov_max = math.inf
        if not (isinstance(cov_max, (int, float)) and cov_max > 0):
            raise ValueError(f"cov_max must be a number > 0 (or None for no cap), got {cov_max!r}")
        if clip_pixels is not None and not (isinstance(clip_pixels, (int, float)) and clip_pixels > 0):
            raise ValueError(f"clip_pixels must be a number > 0 or None, got {clip_pixels!r}")
        self.head = head
        self.cov_max = float(cov_max)
        self.clip_pixels = None if clip_pixels is None else float(clip_pixels)
        # The covariance term injects noise even where the base sampler has none (DDIM, eta = 0).
        self.uses_noise = True


    def _call_model(self, model, x, t):
        if self.head is None:
            out = model(x, t)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError("with head=None an OCM sampler needs model(x_t, t) to return (output, h); "
                                "otherwise pass head=callable(x_t, t) -> h")
            output, h = out
        else:
            output, h = model(x, t), self.head(x, t)
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"the covariance head must return a tensor, got {type(h).__name__}")
        # h goes to the kernel in float32 whatever x's dtype: Sigma0 = (sigma^2/ab)(1 + h) multiplies
        # the rounding of h by sigma^2/ab (~2.5e4 at t = 999), so a bf16 h would lose Sigma0 there.
        return output, (h if h.dtype == torch.float32 else h.float())

    def _step(self, x, model_output, aux, table, step, seed, sample_offset):
        thresholds = self._thresholds(x, model_output, table, step) if self.thresholding else None
        vp_step(x, model_output, table, step, prediction_type=self.prediction_type, clip_range=self.clip_range,
                thresholds=thresholds, recompute_eps=self.use_clipped_model_output, seed=seed,
                sample_offset=sample_offset, var_mode="ocm", aux=aux, cov_max=self.cov_max, out=x,
                backend=self.backend)


class OCMDDPMSampler(_OCMMixin, DDPMSampler):
    """OCM-DDPM: the DDPM ancestral mean with variance
    beta_tilde + (sqrt(ab_s) beta_{t|s}/sigma_t^2)^2 clamp((sigma_t^2/ab_t)(1 + h), 0, cov_max).

    ``head``: callable (x_t, t) -> h, or None when the model returns (output, h).
    ``cov_max``: upper clamp of Sigma0 (1 for data in [-1, 1]; None for no cap).
    ``clip_pixels``: cap the variance of the second-to-last step (see ``second_to_last_var_cap``);
    None (default) leaves it alone.
    """

    name = "ocm-ddpm"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, head: Optional[Callable] = None,
                 cov_max: Optional[float] = 1.0, clip_pixels: Optional[float] = None, **kw):
        variance_type = kw.pop("variance_type", "fixed_small")
        if variance_type not in ("fixed_small", "fixed_small_log"):
            raise ValueError("OCM-DDPM adds the covariance term to the fixed_small variance beta_tilde (the "
                             f"variance of q(x_s | x_t, x0)); variance_type must be 'fixed_small', "
                             f"got {variance_type!r}")
        super().__init__(schedule, steps, variance_type=variance_type, **kw)
        self._ocm_init(head, cov_max, clip_pixels)

    def _host_table(self) -> np.ndarray:
        return C.ddpm_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.variance_type, 1.0, "last", ocm=True, clip_pixels=self.clip_pixels or 0.0)


class OCMDDIMSampler(_OCMMixin, DDIMSampler):
    """OCM-DDIM (any eta): the DDIM mean with variance
    lambda^2 + (sqrt(ab_s) - sqrt(sigma_s^2 - lambda^2) sqrt(ab_t)/sigma_t)^2 clamp(Sigma0, 0, cov_max),
    non-zero even at eta = 0. Arguments as OCMDDPMSampler, plus DDIMSampler's (eta, ...)."""

    name = "ocm-ddim"

    def __init__(self, schedule=None, steps: Optional[int] = 50, *, head: Optional[Callable] = None,
                 cov_max: Optional[float] = 1.0, clip_pixels: Optional[float] = None, **kw):
        super().__init__(schedule, steps, **kw)
        self._ocm_init(head, cov_max, clip_pixels)

    def _host_table(self) -> np.ndarray:
        return C.ddim_table(self.schedule.alphas_cumprod.numpy(), self.timesteps, self.prev_timesteps,
                            self.eta, self._final_alpha_cumprod(), ocm=True, clip_pixels=self.clip_pixels or 0.0)


register_sampler("ocm-ddpm", OCMDDPMSampler)
register_sampler("ocm-ddim", OCMDDIMSampler)


# ----------------------------------------------------------------------------------------------
# the covariance-matching objective


def _eps_from_output(output, x_t, sqrt_ab, sigma, prediction_type):
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return sqrt_ab * output + sigma * x_t
    if prediction_type == "sample":
        return (x_t - sqrt_ab * output) / sigma
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def _coeffs(schedule: Schedule, t, x_t):
    """sqrt(ab_t), sigma_t as [B, 1, ...] tensors in x_t's dtype (a device gather, no sync)."""
    idx = torch.as_tensor(t, device=x_t.device).reshape(-1).long()
    ab = schedule.alphas_cumprod_on(x_t.device).index_select(0, idx)
    ab = ab.expand(x_t.shape[0]) if ab.numel() == 1 else ab
    ab = ab.to(x_t.dtype).reshape((-1,) + (1,) * (x_t.dim() - 1))
    return ab.sqrt(), (1.0 - ab).sqrt()


def ocm_target(eps_model, x_t: torch.Tensor, t, schedule=None, *, prediction_type: str = "epsilon", probes: int = 1,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The unbiased estimate sigma_t^2 (v * Hv) of h = sigma_t^2 diag nabla^2 log p_t(x_t),
    averaged over ``probes`` Rademacher probes v, with Hv = nabla_x <s(x), v> and the model's
    score s = -eps/sigma_t: one forward pass and one vector-Jacobian product per probe.
    The model is only differentiated, never updated; the result is detached, x_t's shape."""
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point() or x_t.dim() < 1:
        raise TypeError("x_t must be a floating-point tensor with a batch dimension")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    schedule = Schedule.coerce(schedule)
    # inference_mode(False): a sampler run under torch.inference_mode() hands us inference tensors,
    # which enable_grad alone cannot differentiate through; everything the graph saves is made here.
    with torch.inference_mode(False), torch.enable_grad():
        sqrt_ab, sigma = (c.clone() for c in _coeffs(schedule, t, x_t))
        x = x_t.detach().clone().requires_grad_(True)
        t_dev = torch.as_tensor(t, device=x_t.device)
        t_dev = t_dev.expand(x.shape[0]) if t_dev.dim() == 0 else t_dev
        eps = _eps_from_output(eps_model(x, t_dev), x, sqrt_ab, sigma, prediction_type)
        score = -eps / sigma
        acc = torch.zeros_like(x_t)
        for i in range(probes):
            v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
            (hv,) = torch.autograd.grad(score, x, grad_outputs=v, retain_graph=i + 1 < probes)
            acc += v * hv
    return (sigma * sigma * acc / probes).detach()


def ocm_loss(h_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The covariance-matching loss: mean squared error between the head's h and the probe
    target (its minimiser is E[target | x_t] = h, the target being unbiased)."""
    if h_pred.shape != target.shape:
        raise ValueError(f"h_pred and target must have the same shape, got {tuple(h_pred.shape)} and "
                         f"{tuple(target.shape)}")
    return ((h_pred - target.to(h_pred.dtype)) ** 2).mean()


class ProbeHead:
    """The training-free head: at each call, h is estimated from the eps model itself by
    ``probes`` Rademacher probes (``ocm_target``). Costs one forward and ``probes`` backward
    passes of the model per step, on top of the sampler's own forward pass. The probes come from
    one generator per device seeded once with ``seed``: a reused ProbeHead continues that stream,
    so two runs with the same sampler seed differ slightly; make a new ProbeHead per run (or call
    ``reset()``) to repeat a run exactly."""

    def __init__(self, eps_model, schedule=None, probes: int = 8, *, prediction_type: str = "epsilon",
                 seed: int = 0):
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be an int >= 1, got {probes!r}")
        self.eps_model, self.schedule, self.probes = eps_model, Schedule.coerce(schedule), probes
        self.prediction_type, self.seed = prediction_type, int(seed)
        self._generators = {}

    def reset(self) -> None:
        """Restart the probe stream from ``seed``."""
        self._generators.clear()

    def __call__(self, x_t, t):
        gen = self._generators.get(x_t.device)
        if gen is None:
            gen = self._generators[x_t.device] = torch.Generator(device=x_t.device).manual_seed(self.seed)
        return ocm_target(self.eps_model, x_t, t, self.schedule, prediction_type=self.prediction_type,
                          probes=self.probes, generator=gen).float()


class MLPHead(torch.nn.Module):
    """A small covariance head for flat data [B, dim]: an MLP on (x_t, features of log-SNR(t))
    predicting h. ``h = -1 + softplus(raw)`` keeps Sigma0 = (sigma^2/ab)(1 + h) >= 0."""

    def __init__(self, dim: int, schedule=None, hidden: int = 128, depth: int = 3, n_freq: int = 8):
        super().__init__()
        self.schedule = Schedule.coerce(schedule)
        ab = self.schedule.alphas_cumprod.clamp(1e-12, 1 - 1e-12)
        self.register_buffer("log_snr", (ab / (1 - ab)).log().float())
        self.register_buffer("freqs", torch.arange(1, n_freq + 1, dtype=torch.float32) * 0.15)
        layers, width = [], dim + 2 * n_freq + 1
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, dim))
        self.net = torch.nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x_t, t):
        lam = self.log_snr.index_select(0, torch.as_tensor(t, device=x_t.device).reshape(-1).long())
        lam = lam.expand(x_t.shape[0]) if lam.numel() == 1 else lam
        ang = lam[:, None] * self.freqs[None]
        feats = torch.cat([x_t.reshape(x_t.shape[0], -1).float(), torch.sin(ang), torch.cos(ang),
                           lam[:, None] / 10], dim=1)
        raw = self.net(feats)
        return (torch.nn.functional.softplus(raw) - 1.0).reshape(x_t.shape)


def train_head(head: torch.nn.Module, eps_model, sample_x0: Callable, schedule=None, *, steps: int = 1000,
               batch_size: int = 256, lr: float = 1e-3, probes: int = 1, prediction_type: str = "epsilon",
               t_range: Optional[tuple] = None, seed: int = 0, device=None, progress: bool = False,
               log_every: int = 100, callback: Optional[Callable] = None) -> list:
    """Fit ``head(x_t, t) -> h`` by the covariance-matching objective with ``eps_model`` frozen.

    ``sample_x0(n, generator)`` draws n clean training samples (e.g. ``GaussianMixture.sample_x0``,
    or a closure over a dataset). Each step draws t uniformly in ``t_range`` (default all
    training timesteps), x_t = sqrt(ab_t) x0 + sigma_t eps, the probe target (``ocm_target``),
    and takes an Adam step on ``ocm_loss``. Progress: a tqdm bar (``progress=True``) and/or
    ``callback(step, mean_loss)`` every ``log_every`` steps. Returns the list of
    (step, mean loss over the last ``log_every`` steps).
    """
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"head must be a torch.nn.Module taking (x_t, t), got {type(head).__name__}")
    if not callable(sample_x0):
        raise TypeError("sample_x0 must be a callable (n, generator) -> x0")
    if not (isinstance(steps, int) and steps >= 1 and isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"steps and batch_size must be ints >= 1, got {steps!r} and {batch_size!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be an int >= 1, got {log_every!r}")
    schedule = Schedule.coerce(schedule)
    n_train = schedule.num_train_timesteps
    lo, hi = t_range if t_range is not None else (0, n_train)
    if not 0 <= lo < hi <= n_train:
        raise ValueError(f"t_range must satisfy 0 <= low < high <= {n_train}, got {(lo, hi)}")
    device = torch.device(device) if device is not None else next(head.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    params = list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    frozen = [p for p in (eps_model.parameters() if isinstance(eps_model, torch.nn.Module) else ())]
    was = [p.requires_grad for p in frozen]
    for p in frozen:  # differentiate through the eps network, never into it
        p.requires_grad_(False)
    history, running = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="fastdiff OCM head")
    try:
        head.train()
        for step in range(1, steps + 1):
            x0 = sample_x0(batch_size, gen).to(device=device, dtype=torch.float32)
            t = torch.randint(lo, hi, (batch_size,), generator=gen, device=device)
            sqrt_ab, sigma = _coeffs(schedule, t, x0)
            noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
            x_t = sqrt_ab * x0 + sigma * noise
            target = ocm_target(eps_model, x_t, t, schedule, prediction_type=prediction_type, probes=probes,
                                generator=gen)
            loss = ocm_loss(head(x_t, t), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(loss.detach())
            if step % log_every == 0 or step == steps:
                mean = float(torch.stack(running).mean())  # one sync per log_every steps
                running.clear()
                history.append((step, mean))
                if callback is not None:
                    callback(step, mean)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.4g}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for p, w in zip(frozen, was):
            p.requires_grad_(w)
        head.eval()
    return history

"""The analytic test bed: a diagonal Gaussian mixture with exact posterior quantities.

p_0 = sum_k w_k N(mu_k, diag s_k^2) stays a mixture under the VP forward process
x_t = sqrt(ab_t) x0 + sigma_t eps:

    p_t = sum_k w_k N(a mu_k, diag(v_k)),   a = sqrt(ab_t),  v_k = a^2 s_k^2 + sigma_t^2.

With responsibilities r_k(x_t) (a softmax over log w_k + log N_k, computed by log-sum-exp),
each component's posterior over x0 is Gaussian with

    mean m_k = mu_k + a s_k^2 / v_k (x_t - a mu_k),   variance c_k = s_k^2 sigma_t^2 / v_k,

so E[x0|x_t] = sum_k r_k m_k and diag Cov[x0|x_t] = sum_k r_k (c_k + (m_k - E[x0|x_t])^2)
(written around the mean to avoid the cancellation of E[x0^2] - E[x0]^2). The score is
g = sum_k r_k g_k with g_k = -(x_t - a mu_k) / v_k and the Hessian diagonal is
sum_k r_k ((g_k - g)^2 - 1 / v_k). Tweedie's identities hold exactly:
E[x0|x_t] = (x_t + sigma_t^2 g) / a and Cov[x0|x_t] = (sigma_t^2 / a^2)(1 + h) with
h = sigma_t^2 diag(nabla^2 log p_t).

Nothing above is specific to VP: on any Gaussian path x_t = a x0 + b eps the same formulas
hold with a and b^2 = sigma_t^2 in place of sqrt(ab_t) and 1 - ab_t. The rectified-flow path
x_t = (1 - sigma) x0 + sigma eps (a = 1 - sigma, b = sigma) is ``sigma=``; there the model
predicts the velocity u = eps - x0, whose posterior mean is E[eps|x_t] - E[x0|x_t] (``velocity``),
Tweedie reads E[x0|x_t] = (x_t + sigma^2 g) / (1 - sigma), and, a + b being 1,
E[u|x_t] = -(x_t + sigma g) / (1 - sigma); h = sigma^2 diag(nabla^2 log p_t) and
Cov[x0|x_t] = (sigma^2 / (1 - sigma)^2)(1 + h). (Equivalently x_t / c with
c = sqrt((1 - sigma)^2 + sigma^2) is a VP state with alpha_bar = (1 - sigma)^2 / c^2 and the same
posterior over x0, and h is the same number on both; tests/test_flow_testbed.py checks it. The
flow path is computed directly rather than through that map, which would take b^2 = 1 - ab as a
difference and lose its digits as sigma -> 0: at sigma = 1e-3 the map's h is off by 6e-13 in
float64, and in float32 ab rounds to 1 below sigma ~ 2.4e-4.)

Every method takes ``x_t`` of shape [B, *shape] with prod(shape) == dim (images work: the
trailing dimensions are flattened) and the time as one of: ``t``, an int tensor [B] (or a Python
int / 0-d tensor, broadcast) of discrete VP timesteps indexing ``schedule.alphas_cumprod``;
``alpha_bar=`` (a float tensor [B] or a float), continuous VP time; ``sigma=`` (a float tensor
[B] or a float in [0, 1]), the flow path. Arithmetic runs in the mixture's dtype (float64 by
default); results come back in x_t's dtype. ``flow_model`` / ``flow_head`` are the exact network
and OCM head of the flow samplers (called with t = sigma * num_train_timesteps).

Sample-quality metrics against exact samples: fastdiff.testbed.metrics.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch

from ..engine.predictions import FLOW_PREDICTIONS, PREDICTIONS, check_prediction, model_output
from ..engine.schedule import FlowSchedule, Schedule

# What a flow-path model may predict (v_prediction assumes a^2 + b^2 = 1, the VP path).

__all__ = ["FlowMixtureModel", "GaussianMixture", "MixtureModel"]


def _as_tensor(v, dtype, name):
    if isinstance(v, torch.Tensor):
        return v.detach().to(dtype=dtype, device="cpu")
    try:
        return torch.as_tensor(v, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or a nested sequence of numbers, got {type(v).__name__}") from exc


class GaussianMixture:
    """p_0 = sum_k weights[k] N(means[k], diag(stds[k]^2)) in ``dim`` dimensions.

    ``weights``: [K] positive (normalised here); ``means``: [K, dim]; ``stds``: [K, dim], [K]
    or a scalar, all > 0. ``schedule``: anything ``Schedule.coerce`` takes (default: linear,
    1000 steps). ``dtype``: the arithmetic precision (float64 default, float32 allowed).
    """

    def __init__(self, weights, means, stds, schedule=None, dtype: torch.dtype = torch.float64):
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        means = _as_tensor(means, torch.float64, "means")
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape [n_components, dim] with both >= 1, got {tuple(means.shape)}")
        k, d = means.shape
        weights = _as_tensor(weights, torch.float64, "weights").reshape(-1)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [n_components] = [{k}], got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or not bool((weights > 0).all()):
            raise ValueError("weights must be finite and > 0")
        stds = _as_tensor(stds, torch.float64, "stds")
        if stds.dim() == 0:
            stds = stds.expand(k, d)
        elif stds.dim() == 1 and stds.shape[0] == k:
            stds = stds[:, None].expand(k, d)
        if tuple(stds.shape) != (k, d):
            raise ValueError(f"stds must be a scalar, [n_components] = [{k}] or [n_components, dim] = [{k}, {d}], "
                             f"got {tuple(stds.shape)}")
        if not bool(torch.isfinite(stds).all()) or not bool((stds > 0).all()):
            raise ValueError("stds must be finite and > 0")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        self.schedule = Schedule.coerce(schedule)
        self.dtype = dtype
        self.n_components, self.dim = int(k), int(d)
        self.weights = (weights / weights.sum()).to(dtype)
        self.means = means.to(dtype).contiguous()
        self.stds = stds.to(dtype).contiguous()
        self._cache = {}

    @classmethod
    def random(cls, dim: int, n_components: int, std_range: Sequence[float] = (0.005, 0.3), seed: int = 0,
               mean_range: float = 0.7, schedule=None, dtype: torch.dtype = torch.float64) -> "GaussianMixture":
        """A random mixture of tight modes: means uniform in [-mean_range, mean_range]^dim,
        per-dimension stds log-uniform in ``std_range`` (so scales differ by up to
        std_range[1] / std_range[0] within one mode), weights uniform in [0.5, 1.5] normalised."""
        if not isinstance(dim, int) or dim < 1 or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"dim and n_components must be ints >= 1, got {dim!r} and {n_components!r}")
        lo, hi = (float(v) for v in std_range)
        if not 0 < lo <= hi:
            raise ValueError(f"std_range must satisfy 0 < low <= high, got {tuple(std_range)}")
        g = torch.Generator().manual_seed(int(seed))
        means = (torch.rand(n_components, dim, generator=g, dtype=torch.float64) * 2 - 1) * mean_range
        u = torch.rand(n_components, dim, generator=g, dtype=torch.float64)
        stds = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
        return cls(weights, means, stds, schedule=schedule, dtype=dtype)

    def __repr__(self) -> str:
        return (f"GaussianMixture(n_components={self.n_components}, dim={self.dim}, "
                f"std range [{float(self.stds.min()):.3g}, {float(self.stds.max()):.3g}], {self.schedule})")

    # -- parameters on a device ---------------------------------------------------------------
    def _params(self, device):
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = (
                self.weights.to(device).log(), self.means.to(device), self.stds.to(device) ** 2,
                self.schedule.alphas_cumprod.to(device=device, dtype=self.dtype))
        return self._cache[device]

    def _flat(self, x_t):
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
            raise TypeError(f"x_t must be a floating-point tensor, got "
                            f"{x_t.dtype if isinstance(x_t, torch.Tensor) else type(x_t).__name__}")
        if x_t.dim() < 2 or math.prod(x_t.shape[1:]) != self.dim:
            raise ValueError(f"x_t must have shape [batch, *shape] with prod(shape) = dim = {self.dim}, "
                             f"got {tuple(x_t.shape)}")
        return x_t.reshape(x_t.shape[0], self.dim).to(self.dtype)

    def _alpha_bar(self, t, alpha_bar, batch, device):
        """ab_t as a [batch, 1] tensor in the mixture's dtype (no host sync: a device gather)."""
        if alpha_bar is not None:
            if t is not None:
                raise ValueError("give t (discrete timesteps) or alpha_bar, not both")
            if not isinstance(alpha_bar, torch.Tensor) or alpha_bar.device.type == "cpu":
                host = torch.as_tensor(alpha_bar, dtype=torch.float64)  # checkable without a device sync
                if not bool(((host >= 0) & (host <= 1)).all()):
                    raise ValueError(f"alpha_bar must lie in [0, 1], got {host.reshape(-1)[:8].tolist()}")
            ab = torch.as_tensor(alpha_bar, dtype=self.dtype, device=device).reshape(-1)
        else:
            if t is None:
                raise ValueError("a time is required: t (discrete VP timesteps), alpha_bar= (VP) or sigma= "
                                 "(the flow path)")
            on_host = not isinstance(t, torch.Tensor) or t.device.type == "cpu"
            t = torch.as_tensor(t, device=device)
            if t.is_floating_point() or t.is_complex():
                raise TypeError(f"t must hold integer timesteps indexing schedule.alphas_cumprod, got {t.dtype}; "
                                "pass alpha_bar= for continuous time")
            n_train = self.schedule.num_train_timesteps
            if on_host and t.numel() and not bool(((t >= 0) & (t < n_train)).all()):  # CPU values: no sync
                raise ValueError(f"t must lie in [0, num_train_timesteps={n_train}), got "
                                 f"{t.reshape(-1)[:8].tolist()}")
            ab = self._params(device)[3].index_select(0, t.reshape(-1).long())
        if ab.numel() == 1:
            ab = ab.expand(batch)
        if ab.shape != (batch,):
            raise ValueError(f"t / alpha_bar must have one entry per sample ({batch}) or be a scalar, "
                             f"got {ab.numel()} entries")
        return ab[:, None]

    def _sigma(self, sigma, batch, device):
        """The flow path's sigma as a [batch, 1] tensor in the mixture's dtype."""
        if not isinstance(sigma, torch.Tensor) or sigma.device.type == "cpu":
            host = torch.as_tensor(sigma, dtype=torch.float64)  # checkable without a device sync
            if not bool(((host >= 0) & (host <= 1)).all()):
                raise ValueError(f"sigma (the flow path's noise level) must lie in [0, 1], got "
                                 f"{host.reshape(-1)[:8].tolist()}")
        s = torch.as_tensor(sigma, dtype=self.dtype, device=device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch)
        if s.shape != (batch,):
            raise ValueError(f"sigma must have one entry per sample ({batch}) or be a scalar, got {s.numel()} entries")
        return s[:, None]

    def _path(self, t, alpha_bar, sigma, batch, device):
        """(a, b^2) of the path x_t = a x0 + b eps at the given time, [batch, 1] each in the
        mixture's dtype: (sqrt(ab), 1 - ab) on the VP path, (1 - sigma, sigma^2) on the flow path."""
        if sigma is not None:
            if t is not None or alpha_bar is not None:
                raise ValueError("give one time: t or alpha_bar (the VP path) or sigma (the flow path)")
            s = self._sigma(sigma, batch, device)
            return 1.0 - s, s * s
        ab = self._alpha_bar(t, alpha_bar, batch, device)
        return ab.sqrt(), 1.0 - ab

    def _posterior(self, x_t, t, alpha_bar, sigma=None):
        """Responsibilities and per-component quantities, all [B, K, D] (r: [B, K, 1])."""
        x = self._flat(x_t)
        log_w, mu, s2, _ = self._params(x.device)
        a, b2 = self._path(t, alpha_bar, sigma, x.shape[0], x.device)  # [B, 1] each
        a = a[:, :, None]  # [B, 1, 1]
        sig2 = b2[:, :, None]
        var = a * a * s2[None] + sig2  # [B, K, D]
        diff = x[:, None, :] - a * mu[None]  # [B, K, D]
        log_n = -0.5 * (diff * diff / var + torch.log(2 * math.pi * var)).sum(-1)  # [B, K]
        log_joint = log_w[None] + log_n
        log_p = torch.logsumexp(log_joint, dim=1)  # [B]
        r = torch.exp(log_joint - log_p[:, None])[:, :, None]  # [B, K, 1]
        return x, a, sig2, var, diff, r, log_p

    def _out(self, v, x_t):
        return v.reshape(x_t.shape).to(x_t.dtype)

    # -- exact quantities (any path: t / alpha_bar on VP, sigma on the flow path) ----------------
    def log_prob(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """log p_t(x_t), shape [B]."""
        lp = self._posterior(x_t, t, alpha_bar, sigma)[-1]
        return lp.to(x_t.dtype)

    def score(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """nabla log p_t(x_t) = sum_k r_k (-(x_t - a mu_k) / v_k)."""
        _, _, _, var, diff, r, _ = self._posterior(x_t, t, alpha_bar, sigma)
        return self._out((r * (-diff / var)).sum(1), x_t)

    def eps(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """E[eps|x_t] = -b * score (stable as b -> 0, unlike (x_t - a x0_hat)/b)."""
        _, _, sig2, var, diff, r, _ = self._posterior(x_t, t, alpha_bar, sigma)
        return self._out(sig2[:, :, 0].sqrt() * (r * diff / var).sum(1), x_t)

    def _x0_mean_var(self, x_t, t, alpha_bar, sigma=None):
        _, a, sig2, var, diff, r, _ = self._posterior(x_t, t, alpha_bar, sigma)
        _, mu, s2, _ = self._params(diff.device)
        m_k = mu[None] + a * s2[None] / var * diff  # [B, K, D]
        c_k = s2[None] * sig2 / var
        mean = (r * m_k).sum(1)
        dev = m_k - mean[:, None]
        return mean, (r * (c_k + dev * dev)).sum(1)

    def x0_mean(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """E[x0|x_t] = sum_k r_k m_k."""
        return self._out(self._x0_mean_var(x_t, t, alpha_bar, sigma)[0], x_t)

    def x0_var(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """diag Cov[x0|x_t] = sum_k r_k (c_k + (m_k - E[x0|x_t])^2)."""
        return self._out(self._x0_mean_var(x_t, t, alpha_bar, sigma)[1], x_t)

    def v(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """The v-prediction target a * eps - sigma_t * x0 with the exact eps and x0 (VP path only)."""
        if sigma is not None:
            raise ValueError("v_prediction assumes a^2 + b^2 = 1 (the VP path); on the flow path use velocity()")
        x = self._flat(x_t)
        ab = self._alpha_bar(t, alpha_bar, x.shape[0], x.device)
        e = self.eps(x_t.to(self.dtype), t, alpha_bar=alpha_bar).reshape(x.shape)
        x0 = self.x0_mean(x_t.to(self.dtype), t, alpha_bar=alpha_bar).reshape(x.shape)
        return self._out(model_output(x0, e, ab.sqrt(), (1.0 - ab).sqrt(), "v_prediction"), x_t)

    def velocity(self, x_t, sigma) -> torch.Tensor:
        """The flow path's exact velocity E[u|x_t] = E[eps|x_t] - E[x0|x_t], u = eps - x0, at
        x_t = (1 - sigma) x0 + sigma eps (one posterior pass; finite at sigma = 0 and 1, where
        -(x_t + sigma g)/(1 - sigma) would divide by zero)."""
        _, a, sig2, var, diff, r, _ = self._posterior(x_t, None, None, sigma)
        _, mu, s2, _ = self._params(diff.device)
        eps = sig2[:, :, 0].sqrt() * (r * diff / var).sum(1)
        x0 = (r * (mu[None] + a * s2[None] / var * diff)).sum(1)
        return self._out(eps - x0, x_t)

    def hessian_diag(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """diag nabla^2 log p_t(x_t) = sum_k r_k ((g_k - g)^2 - 1 / v_k)."""
        return self._out(self._score_hess(x_t, t, alpha_bar, sigma)[1], x_t)

    def h(self, x_t, t=None, *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """h = b^2 diag nabla^2 log p_t (what an OCM head predicts); Sigma0 = (b^2/a^2)(1 + h)
        (b^2/a^2 = sigma_t^2/ab_t on VP, sigma^2/(1 - sigma)^2 on the flow path)."""
        _, hess, sig2 = self._score_hess(x_t, t, alpha_bar, sigma)
        return self._out(sig2 * hess, x_t)

    def _score_hess(self, x_t, t, alpha_bar, sigma=None):
        """(score [B, D], Hessian diagonal [B, D], b^2 [B, 1]) from one pass over the
        [B, K, D] posterior tensors."""
        _, _, sig2, var, diff, r, _ = self._posterior(x_t, t, alpha_bar, sigma)
        g_k = -diff / var
        g = (r * g_k).sum(1, keepdim=True)
        return g[:, 0], (r * ((g_k - g) ** 2 - 1.0 / var)).sum(1), sig2[:, :, 0]

    def eps_and_h(self, x_t, t=None, *, alpha_bar=None, sigma=None):
        """(eps, h) at the cost of one posterior evaluation (what an OCM sampler consumes)."""
        g, hess, sig2 = self._score_hess(x_t, t, alpha_bar, sigma)
        return self._out(-sig2.sqrt() * g, x_t), self._out(sig2 * hess, x_t)

    def predict(self, x_t, t=None, prediction_type: str = "epsilon", *, alpha_bar=None, sigma=None) -> torch.Tensor:
        """The exact network output for ``prediction_type``: "epsilon", "v_prediction", "sample" on
        the VP path (t or alpha_bar); "flow_prediction", "epsilon", "sample" on the flow path (sigma)."""
        if sigma is not None:
            if prediction_type not in FLOW_PREDICTIONS:
                raise ValueError(f"prediction_type on the flow path must be one of {FLOW_PREDICTIONS}, got "
                                 f"{prediction_type!r}")
            if prediction_type == "flow_prediction":
                if t is not None or alpha_bar is not None:
                    raise ValueError("give one time: t or alpha_bar (the VP path) or sigma (the flow path)")
                return self.velocity(x_t, sigma)
        if prediction_type == "epsilon":
            return self.eps(x_t, t, alpha_bar=alpha_bar, sigma=sigma)
        if prediction_type == "v_prediction":
            return self.v(x_t, t, alpha_bar=alpha_bar)
        if prediction_type == "sample":
            return self.x0_mean(x_t, t, alpha_bar=alpha_bar, sigma=sigma)
        if prediction_type == "flow_prediction":
            raise ValueError("flow_prediction is the flow path's output: pass sigma= "
                             "(x_t = (1 - sigma) x0 + sigma eps)")
        raise ValueError(f"prediction_type must be one of {PREDICTIONS[:3]} on the VP path, got {prediction_type!r}")

    def model(self, prediction_type: str = "epsilon", return_h: bool = False) -> "MixtureModel":
        """A ``model(x_t, t)`` for every VP sampler (``return_h=True``: returns (output, h),
        the OCM samplers' combined-model convention). Flow samplers: ``flow_model``."""
        if check_prediction(prediction_type) == "flow_prediction":
            raise ValueError("flow_prediction needs the flow path; this is the VP model, use flow_model()")
        return MixtureModel(self, prediction_type, return_h)

    def head(self):
        """The exact OCM head on the VP path: a callable (x_t, t) -> h."""
        return self.h

    def flow_model(self, schedule=None, prediction_type: str = "flow_prediction",
                   return_h: bool = False) -> "FlowMixtureModel":
        """The exact network of the flow samplers: ``model(x_t, t)`` with t = sigma * N (float,
        N = the FlowSchedule's num_train_timesteps, default 1000) returns E[u|x_t] (or eps /
        x0 for ``prediction_type`` "epsilon" / "sample"); ``return_h=True``: (output, h)."""
        if prediction_type not in FLOW_PREDICTIONS:
            raise ValueError(f"prediction_type on the flow path must be one of {FLOW_PREDICTIONS}, got "
                             f"{prediction_type!r}")
        return FlowMixtureModel(self, FlowSchedule.coerce(schedule).num_train_timesteps, prediction_type, return_h)

    def flow_head(self, schedule=None):
        """The exact OCM head of the flow samplers (ocm-flow's ``head=``): a callable (x_t, t) -> h
        = sigma^2 diag nabla^2 log p_t(x_t) with t = sigma * N."""
        return functools.partial(_flow_h, self, FlowSchedule.coerce(schedule).num_train_timesteps)

    # -- sampling -----------------------------------------------------------------------------
    def sample_x0(self, n: int, generator: Optional[torch.Generator] = None, *, device=None,
                  return_labels: bool = False):
        """n exact samples of p_0, [n, dim] in the mixture's dtype (and their component labels)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        device = torch.device(device) if device is not None else (
            generator.device if generator is not None else torch.device("cpu"))
        log_w, mu, s2, _ = self._params(device)
        labels = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=device)
        x0 = mu[labels] + s2[labels].sqrt() * z
        return (x0, labels) if return_labels else x0

    def sample_xt(self, n: int, t, generator: Optional[torch.Generator] = None, *, device=None):
        """(x0, x_t, eps) with x0 ~ p_0, x_t = sqrt(ab_t) x0 + sigma_t eps; ``t`` an int or [n] ints."""
        x0 = self.sample_x0(n, generator, device=device)
        ab = self._alpha_bar(t, None, n, x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=self.dtype, device=x0.device)
        return x0, ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps, eps

    def sample_flow_xt(self, n: int, sigma, generator: Optional[torch.Generator] = None, *, device=None):
        """(x0, x_t, eps) with x0 ~ p_0, x_t = (1 - sigma) x0 + sigma eps; ``sigma`` a float or [n]."""
        x0 = self.sample_x0(n, generator, device=device)
        s = self._sigma(sigma, n, x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=self.dtype, device=x0.device)
        return x0, (1.0 - s) * x0 + s * eps, eps

    def assign(self, x0: torch.Tensor) -> torch.Tensor:
        """The most probable component of each x0 under p_0 (argmax_k r_k at ab = 1), int64 [B]."""
        x = self._flat(x0)
        log_w, mu, s2, _ = self._params(x.device)
        diff = x[:, None, :] - mu[None]
        log_joint = log_w[None] - 0.5 * (diff * diff / s2[None] + torch.log(2 * math.pi * s2[None])).sum(-1)
        return log_joint.argmax(1)


class MixtureModel(torch.nn.Module):
    """The exact network of a GaussianMixture: ``model(x_t, t) -> output`` (or (output, h))."""

    def __init__(self, mixture: GaussianMixture, prediction_type: str = "epsilon", return_h: bool = False):
        super().__init__()
        self.mixture, self.prediction_type, self.return_h = mixture, prediction_type, bool(return_h)

    def forward(self, x_t, t):
        if self.return_h and self.prediction_type == "epsilon":
            return self.mixture.eps_and_h(x_t, t)
        out = self.mixture.predict(x_t, t, self.prediction_type)
        return (out, self.mixture.h(x_t, t)) if self.return_h else out


def _sigma_of_timestep(t, num_train_timesteps, dtype):
    """sigma = t / N from the flow samplers' float timesteps t = sigma * N (no host sync)."""
    return torch.as_tensor(t).to(dtype) / num_train_timesteps


def _flow_h(mixture: GaussianMixture, num_train_timesteps: int, x_t, t):
    return mixture.h(x_t, sigma=_sigma_of_timestep(t, num_train_timesteps, mixture.dtype))


class FlowMixtureModel(torch.nn.Module):
    """The exact flow-path network of a GaussianMixture: ``model(x_t, t) -> output`` (or
    (output, h)) with t = sigma * num_train_timesteps, as the flow samplers call it."""

    def __init__(self, mixture: GaussianMixture, num_train_timesteps: int = 1000,
                 prediction_type: str = "flow_prediction", return_h: bool = False):
        super().__init__()
        self.mixture, self.num_train_timesteps = mixture, int(num_train_timesteps)
        self.prediction_type, self.return_h = prediction_type, bool(return_h)

    def forward(self, x_t, t):
        sigma = _sigma_of_timestep(t, self.num_train_timesteps, self.mixture.dtype)
        out = self.mixture.predict(x_t, prediction_type=self.prediction_type, sigma=sigma)
        return (out, self.mixture.h(x_t, sigma=sigma)) if self.return_h else out

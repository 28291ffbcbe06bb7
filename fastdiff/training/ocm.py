"""Training the OCM covariance head (Ou et al., 2024): the covariance-matching objective, the
heads, and the trainer. Sampling with a head: fastdiff.samplers.ocm.

With the eps network frozen, a Rademacher probe v and the score s = -eps/sigma_t, one
vector-Jacobian product gives Hv = nabla_x <s, v>, and sigma_t^2 (v * Hv) is an unbiased
estimate of h = sigma_t^2 diag nabla^2 log p_t(x_t) (E[v v^T] = I). ``ocm_target`` computes it,
``ocm_loss`` regresses a head on it, ``train_head`` runs the loop (fastdiff.training.trainer).
``ProbeHead`` is the training-free head: the estimate itself at every sampling step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..engine.predictions import check_prediction, x0_eps
from ..engine.schedule import Schedule
from .trainer import Trainer

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
        eps = x0_eps(x, eps_model(x, t_dev), sqrt_ab, sigma, prediction_type)[1]
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


class _HeadTrainer(Trainer):
    """The covariance-matching objective on a batch of x0: t uniform in [lo, hi), x_t on the
    forward process, the probe target from the frozen eps model, the squared error of the head."""

    def __init__(self, head, eps_model, schedule, *, t_range, probes, prediction_type, batch_size, lr, seed,
                 device):
        super().__init__(head, schedule, batch_size=batch_size, lr=lr, grad_clip=None, seed=seed, device=device)
        self.eps_model, self.t_range, self.probes = eps_model, t_range, probes
        self.prediction_type = prediction_type
        self.iteration = 0

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        lo, hi = self.t_range
        t = torch.randint(lo, hi, (x0.shape[0],), generator=self.generator, device=self.device)
        sqrt_ab, sigma = _coeffs(self.schedule, t, x0)
        x_t = sqrt_ab * x0 + sigma * self.randn_like(x0)
        target = ocm_target(self.eps_model, x_t, t, self.schedule, prediction_type=self.prediction_type,
                            probes=self.probes, generator=self.generator)
        return ocm_loss(self.student(x_t, t), target)


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
    check_prediction(prediction_type)
    schedule = Schedule.coerce(schedule)
    n_train = schedule.num_train_timesteps
    lo, hi = t_range if t_range is not None else (0, n_train)
    if not 0 <= lo < hi <= n_train:
        raise ValueError(f"t_range must satisfy 0 <= low < high <= {n_train}, got {(lo, hi)}")
    trainer = _HeadTrainer(head, eps_model, schedule, t_range=(lo, hi), probes=probes,
                           prediction_type=prediction_type, batch_size=batch_size, lr=lr, seed=seed, device=device)
    frozen = [p for p in (eps_model.parameters() if isinstance(eps_model, torch.nn.Module) else ())]
    was = [p.requires_grad for p in frozen]
    for p in frozen:  # differentiate through the eps network, never into it
        p.requires_grad_(False)
    history, running = [], []

    def log(record):
        running.append(record["loss"])
        step = record["iteration"]
        if step % log_every == 0 or step == steps:
            mean = sum(running) / len(running)
            running.clear()
            history.append((step, mean))
            if callback is not None:
                callback(step, mean)

    try:
        trainer.train_until(sample_x0, steps, {}, trainer.progress_bar(steps, "fastdiff OCM head", progress),
                             log, None, 0)
    finally:
        for p, w in zip(frozen, was):
            p.requires_grad_(w)
        head.eval()
    return history

"""Training the OCM covariance head (Ou et al., 2024): the covariance-matching objective, the
heads, and the trainer. Sampling with a head: fastdiff.samplers.ocm (VP), ocm-flow in
fastdiff.samplers.flow (the flow path).

On a Gaussian path x_t = a_t x0 + b_t eps, with the network frozen, a Rademacher probe v and
the model's score s = -eps_hat/b_t, one vector-Jacobian product gives Hv = nabla_x <s, v>, and
b_t^2 (v * Hv) is an unbiased estimate of h = b_t^2 diag nabla^2 log p_t(x_t) (E[v v^T] = I);
the sampler's covariance is then Sigma0 = (b_t^2 / a_t^2)(1 + h). ``ocm_target`` computes it,
``ocm_loss`` regresses a head on it, ``train_head`` runs the loop (fastdiff.training.trainer).
``ProbeHead`` is the training-free head: the estimate itself at every sampling step.

The path is the schedule's:

* a VP ``Schedule`` (or anything ``Schedule.coerce`` takes): a = sqrt(ab_t), b = sigma_t, t an
  integer timestep, the model read as ``epsilon`` by default;
* a ``FlowSchedule``: the rectified-flow path a = 1 - sigma, b = sigma, the model called with the
  flow samplers' float timestep t = sigma * N (N = num_train_timesteps) and read as
  ``flow_prediction`` by default (u = eps - x0, so eps_hat = x_t + a u).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..engine.predictions import FLOW_PREDICTIONS, PREDICTIONS, VP_PREDICTIONS, x0_eps
from ..engine.schedule import FlowSchedule, Schedule
from .trainer import Trainer

# What a model may predict on each path: v_prediction assumes a^2 + b^2 = 1 (VP), flow_prediction
# a + b = 1 (rectified flow); read on the other path either gives a wrong score without an error.


def _path_schedule(schedule):
    """The schedule that fixes the path: a FlowSchedule as it is, anything else a VP Schedule."""
    return schedule if isinstance(schedule, FlowSchedule) else Schedule.coerce(schedule)


def _prediction(schedule, prediction_type):
    """The prediction type on the schedule's path (None: epsilon on VP, flow_prediction on flow)."""
    flow = isinstance(schedule, FlowSchedule)
    if prediction_type is None:
        return "flow_prediction" if flow else "epsilon"
    allowed = FLOW_PREDICTIONS if flow else VP_PREDICTIONS
    if prediction_type not in allowed:
        if prediction_type in PREDICTIONS:
            raise ValueError(f"prediction_type {prediction_type!r} does not fit the "
                             f"{'flow' if flow else 'VP'} path: it must be one of {allowed} with a "
                             f"{type(schedule).__name__} (v_prediction assumes a^2 + b^2 = 1, flow_prediction "
                             "a + b = 1; pass a FlowSchedule for a flow model)")
        raise ValueError(f"prediction_type must be one of {allowed}, got {prediction_type!r}")
    return prediction_type


def _coeffs(schedule: Schedule, t, x_t):
    """sqrt(ab_t), sigma_t as [B, 1, ...] tensors in x_t's dtype (a device gather, no sync)."""
    idx = torch.as_tensor(t, device=x_t.device).reshape(-1).long()
    ab = schedule.alphas_cumprod_on(x_t.device).index_select(0, idx)
    ab = ab.expand(x_t.shape[0]) if ab.numel() == 1 else ab
    ab = ab.to(x_t.dtype).reshape((-1,) + (1,) * (x_t.dim() - 1))
    return ab.sqrt(), (1.0 - ab).sqrt()


def _flow_coeffs(schedule: FlowSchedule, t, x_t):
    """1 - sigma, sigma as [B, 1, ...] tensors in x_t's dtype from the flow samplers' timesteps
    t = sigma * N (computed in float64, then cast; on the device, no sync)."""
    sigma = torch.as_tensor(t, device=x_t.device).reshape(-1).to(torch.float64) / schedule.num_train_timesteps
    sigma = sigma.expand(x_t.shape[0]) if sigma.numel() == 1 else sigma
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    return (1.0 - sigma).to(x_t.dtype).reshape(shape), sigma.to(x_t.dtype).reshape(shape)


def _path_coeffs(schedule, t, x_t):
    """(a_t, b_t) of the schedule's path as [B, 1, ...] tensors in x_t's dtype: (sqrt(ab_t),
    sigma_t) for a VP Schedule and integer t, (1 - sigma, sigma) with sigma = t / N for a
    FlowSchedule and the flow samplers' float t."""
    if isinstance(schedule, FlowSchedule):
        return _flow_coeffs(schedule, t, x_t)
    return _coeffs(schedule, t, x_t)


def ocm_target(eps_model, x_t: torch.Tensor, t, schedule=None, *, prediction_type: Optional[str] = None,
               probes: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The unbiased estimate b_t^2 (v * Hv) of h = b_t^2 diag nabla^2 log p_t(x_t), averaged over
    ``probes`` Rademacher probes v, with Hv = nabla_x <s(x), v> and the model's score
    s = -eps_hat/b_t: one forward pass and one vector-Jacobian product per probe.

    ``schedule`` fixes the path (module docstring): VP (``t`` integer timesteps, ``eps_model``
    read as ``prediction_type``, default "epsilon") or a FlowSchedule (``t`` = sigma * N as the
    flow samplers pass it, default "flow_prediction": eps_hat = x_t + (1 - sigma) u).
    The model is only differentiated, never updated; the result is detached, x_t's shape."""
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point() or x_t.dim() < 1:
        raise TypeError("x_t must be a floating-point tensor with a batch dimension")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1, got {probes!r}")
    schedule = _path_schedule(schedule)
    prediction_type = _prediction(schedule, prediction_type)
    # inference_mode(False): a sampler run under torch.inference_mode() hands us inference tensors,
    # which enable_grad alone cannot differentiate through; everything the graph saves is made here.
    with torch.inference_mode(False), torch.enable_grad():
        a, b = (c.clone() for c in _path_coeffs(schedule, t, x_t))
        x = x_t.detach().clone().requires_grad_(True)
        t_dev = torch.as_tensor(t, device=x_t.device)
        t_dev = t_dev.expand(x.shape[0]) if t_dev.dim() == 0 else t_dev
        eps = x0_eps(x, eps_model(x, t_dev), a, b, prediction_type)[1]
        score = -eps / b
        acc = torch.zeros_like(x_t)
        for i in range(probes):
            v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
            (hv,) = torch.autograd.grad(score, x, grad_outputs=v, retain_graph=i + 1 < probes)
            acc += v * hv
    return (b * b * acc / probes).detach()


def ocm_loss(h_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The covariance-matching loss: mean squared error between the head's h and the probe
    target (its minimiser is E[target | x_t] = h, the target being unbiased)."""
    if h_pred.shape != target.shape:
        raise ValueError(f"h_pred and target must have the same shape, got {tuple(h_pred.shape)} and "
                         f"{tuple(target.shape)}")
    return ((h_pred - target.to(h_pred.dtype)) ** 2).mean()


class ProbeHead:
    """The training-free head: at each call, h is estimated from the model itself by ``probes``
    Rademacher probes (``ocm_target``), on the schedule's path (a FlowSchedule: the flow samplers'
    t = sigma * N and a velocity model by default). Costs one forward and ``probes`` backward
    passes of the model per step, on top of the sampler's own forward pass. The probes come from
    one generator per device seeded once with ``seed``: a reused ProbeHead continues that stream,
    so two runs with the same sampler seed differ slightly; make a new ProbeHead per run (or call
    ``reset()``) to repeat a run exactly."""

    def __init__(self, eps_model, schedule=None, probes: int = 8, *, prediction_type: Optional[str] = None,
                 seed: int = 0):
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be an int >= 1, got {probes!r}")
        self.eps_model, self.schedule, self.probes = eps_model, _path_schedule(schedule), probes
        self.prediction_type, self.seed = _prediction(self.schedule, prediction_type), int(seed)
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
    predicting h. ``h = -1 + softplus(raw)`` keeps Sigma0 = (b^2/a^2)(1 + h) >= 0.

    On a VP schedule t is an integer timestep and log-SNR = log(ab_t / (1 - ab_t)) is looked up;
    on a FlowSchedule t = sigma * N (float) and log-SNR = 2 log((1 - sigma) / sigma), with sigma
    clamped to [1e-6, 1 - 1e-6] so that the ends stay finite (|log-SNR| <= 27.6)."""

    def __init__(self, dim: int, schedule=None, hidden: int = 128, depth: int = 3, n_freq: int = 8):
        super().__init__()
        self.schedule = _path_schedule(schedule)
        if isinstance(self.schedule, FlowSchedule):
            self._flow_n = self.schedule.num_train_timesteps
        else:
            self._flow_n = None
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

    def _lambda(self, t, device):
        """log-SNR of t as a float32 [B] (or [1]) tensor."""
        t = torch.as_tensor(t, device=device).reshape(-1)
        if self._flow_n is None:
            return self.log_snr.index_select(0, t.long())
        sigma = (t.float() / self._flow_n).clamp(1e-6, 1 - 1e-6)
        return 2.0 * (torch.log1p(-sigma) - torch.log(sigma))

    def forward(self, x_t, t):
        lam = self._lambda(t, x_t.device)
        lam = lam.expand(x_t.shape[0]) if lam.numel() == 1 else lam
        ang = lam[:, None] * self.freqs[None]
        feats = torch.cat([x_t.reshape(x_t.shape[0], -1).float(), torch.sin(ang), torch.cos(ang),
                           lam[:, None] / 10], dim=1)
        raw = self.net(feats)
        return (torch.nn.functional.softplus(raw) - 1.0).reshape(x_t.shape)


class _HeadTrainer(Trainer):
    """The covariance-matching objective on a batch of x0: t uniform in [lo, hi) (VP) or sigma
    uniform in (lo, hi] (flow), x_t on the forward process, the probe target from the frozen
    model, the squared error of the head."""

    def __init__(self, head, eps_model, schedule, *, t_range, probes, prediction_type, batch_size, lr, seed,
                 device):
        super().__init__(head, schedule, batch_size=batch_size, lr=lr, grad_clip=None, seed=seed, device=device)
        self.eps_model, self.t_range, self.probes = eps_model, t_range, probes
        self.prediction_type = prediction_type
        self.iteration = 0

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        if isinstance(self.schedule, FlowSchedule):
            return self._flow_loss(x0)
        lo, hi = self.t_range
        t = torch.randint(lo, hi, (x0.shape[0],), generator=self.generator, device=self.device)
        sqrt_ab, sigma = _coeffs(self.schedule, t, x0)
        x_t = sqrt_ab * x0 + sigma * self.randn_like(x0)
        target = ocm_target(self.eps_model, x_t, t, self.schedule, prediction_type=self.prediction_type,
                            probes=self.probes, generator=self.generator)
        return ocm_loss(self.student(x_t, t), target)

    def _flow_loss(self, x0: torch.Tensor) -> torch.Tensor:
        lo, hi = self.t_range
        # hi - (hi - lo) U with U in [0, 1): sigma in (lo, hi], never 0 (where the score -eps/sigma
        # is undefined); drawn in float64 so that a float32 rounding cannot land on 0 either.
        u = torch.rand(x0.shape[0], generator=self.generator, device=self.device, dtype=torch.float64)
        n = self.schedule.num_train_timesteps
        t = ((hi - (hi - lo) * u) * n).float()  # what the flow samplers hand model and head
        a, b = _flow_coeffs(self.schedule, t, x0)  # from t itself: the sigma the model and head see
        x_t = a * x0 + b * self.randn_like(x0)
        target = ocm_target(self.eps_model, x_t, t, self.schedule, prediction_type=self.prediction_type,
                            probes=self.probes, generator=self.generator)
        return ocm_loss(self.student(x_t, t), target)


def train_head(head: torch.nn.Module, eps_model, sample_x0: Callable, schedule=None, *, steps: int = 1000,
               batch_size: int = 256, lr: float = 1e-3, probes: int = 1, prediction_type: Optional[str] = None,
               t_range: Optional[tuple] = None, sigma_range: Optional[tuple] = None, seed: int = 0, device=None,
               progress: bool = False, log_every: int = 100, callback: Optional[Callable] = None) -> list:
    """Fit ``head(x_t, t) -> h`` by the covariance-matching objective with ``eps_model`` frozen.

    ``sample_x0(n, generator)`` draws n clean training samples (e.g. ``GaussianMixture.sample_x0``,
    or a closure over a dataset). Each step draws a time per sample, x_t on the schedule's path,
    the probe target (``ocm_target``), and takes an Adam step on ``ocm_loss``:

    * VP ``schedule``: t uniform in ``t_range`` (default all training timesteps), x_t =
      sqrt(ab_t) x0 + sigma_t eps; ``prediction_type`` default "epsilon";
    * ``FlowSchedule``: sigma uniform in (low, high] of ``sigma_range`` (default (0, 1]: every
      noise level the flow samplers visit, sigma = 0 excluded, where the score is undefined;
      this weighs all of (0, 1] alike, not the schedule's shifted sigmas), x_t = (1 - sigma) x0 +
      sigma eps, model and head called with t = sigma * N in float32 (x_t is built from that
      rounded t, so all three see one sigma); ``prediction_type`` default "flow_prediction".

    Progress: a tqdm bar (``progress=True``) and/or
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
    schedule = _path_schedule(schedule)
    prediction_type = _prediction(schedule, prediction_type)
    if isinstance(schedule, FlowSchedule):
        if t_range is not None:
            raise ValueError("t_range selects integer VP timesteps; with a FlowSchedule give sigma_range=(low, high)")
        lo, hi = sigma_range if sigma_range is not None else (0.0, 1.0)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"sigma_range must satisfy 0 <= low < high <= 1, got {(lo, hi)}")
        lo, hi = float(lo), float(hi)
    else:
        if sigma_range is not None:
            raise ValueError("sigma_range applies to the flow path (a FlowSchedule); on VP give t_range")
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

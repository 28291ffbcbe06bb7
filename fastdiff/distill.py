"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of
Diffusion Models", ICLR 2022, Algorithm 2).

A student learns to take in one DDIM step what its teacher takes in two. Each round halves the
step count (64 -> 32 -> ... -> 2); the student of one round is the teacher of the next.

For a student step t -> t'' on its N-step grid (t' the teacher's midpoint on the 2N grid):

    z_t = alpha_t x + sigma_t eps,        z_t' = DDIM(teacher, z_t, t -> t'),  z_t'' = DDIM(teacher, z_t', t' -> t'')
    x_target = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)

so that one DDIM step of the student from z_t with x0_hat = x_target lands exactly on z_t''
(x_target = z_t'' on the final step, where alpha = 1, sigma = 0). The student minimises
w(lambda_t) ||x0_hat_student - x_target||^2 with w = max(SNR, 1) ("truncated_snr", the paper's
choice for x0 targets) or SNR + 1 ("snr+1", which is the plain v-prediction loss). Here
alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and SNR = alpha_t^2 / sigma_t^2.

The trainer's state (round, iteration, student, teacher, optimizer, random generator) goes to
and from one file, so that a run can stop and resume anywhere.

``_Trainer`` holds the loop, the data draw, checkpointing and progress reporting that
``ProgressiveDistillation`` shares with ``fastdiff.consistency.ConsistencyDistillation``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from .kernels.vp_step import PREDICTIONS
from .schedule import Schedule

WEIGHTINGS = ("truncated_snr", "snr+1", "uniform")

Data = Union[torch.Tensor, Callable[[int, torch.Generator], torch.Tensor]]


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] vector shaped to broadcast over x's trailing dimensions."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


def x0_eps(x: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str):
    """(x0_hat, eps_hat) from a model output read as ``prediction_type``, with per-sample alpha,
    sigma ([B]). The sampling kernel does the same with one step for the whole batch; training
    needs a different step per sample, hence this batched form."""
    a, s = _bc(alpha, x), _bc(sigma, x)
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - s * out, a * out + s * x
    if prediction_type == "sample":
        return out, (x - a * out) / s
    raise ValueError(f"prediction_type must be one of {tuple(PREDICTIONS)}, got {prediction_type!r}")


def ddim_step(x, out, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type):
    """Deterministic DDIM step (eta = 0) with per-sample coefficients:
    x_s = alpha_s x0_hat + sigma_s eps_hat. Returns (x_s, x0_hat)."""
    x0, eps = x0_eps(x, out, alpha_t, sigma_t, prediction_type)
    return _bc(alpha_s, x) * x0 + _bc(sigma_s, x) * eps, x0


def loss_weight(alpha: torch.Tensor, sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weight on an x0-space squared error (see the module docstring)."""
    if weighting == "uniform":
        return torch.ones_like(alpha)
    snr = alpha.square() / sigma.square().clamp_min(1e-20)
    if weighting == "truncated_snr":
        return snr.clamp_min(1.0)
    if weighting == "snr+1":
        return snr + 1.0
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


class MLPDenoiser(nn.Module):
    """A small time-conditioned MLP for flat data [B, dim] (a student for low-dimensional
    problems such as the analytic test bed): input (x_t, sin/cos features of the timestep)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, n_freq: int = 16, num_train_timesteps: int = 1000):
        super().__init__()
        _check_positive_int("dim", dim)
        self.dim, self.n_freq, self.num_train_timesteps = int(dim), int(n_freq), int(num_train_timesteps)
        layers, width = [], dim + 2 * n_freq
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = t.reshape(-1).expand(x_t.shape[0]).float() / self.num_train_timesteps
        ang = tau[:, None] * (math.pi * torch.arange(1, self.n_freq + 1, device=x_t.device, dtype=torch.float32))[None]
        h = torch.cat([x_t.reshape(x_t.shape[0], -1).float(), torch.sin(ang), torch.cos(ang)], dim=1)
        return self.net(h).reshape(x_t.shape).to(x_t.dtype)


class StepGrid:
    """A descending timestep grid on a schedule with alpha/sigma per grid point, the point after
    the last being the data (alpha_bar = 1, as DDIM's set_alpha_to_one)."""

    def __init__(self, schedule: Schedule, timesteps: np.ndarray, device):
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        ab = schedule.alphas_cumprod.numpy()[self.timesteps]
        ab = np.append(ab, 1.0)  # index K: the data
        self.t = torch.from_numpy(self.timesteps).to(device)
        self.alpha = torch.from_numpy(np.sqrt(ab)).float().to(device)
        self.sigma = torch.from_numpy(np.sqrt(np.maximum(1.0 - ab, 0.0))).float().to(device)

    def __len__(self) -> int:
        return len(self.timesteps)


def _check_model(name, model):
    if not callable(model):
        raise TypeError(f"{name} must be callable as model(x_t, t), got {type(model).__name__}")


def _check_positive_int(name, v, minimum=1):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def resolve_student(teacher, student, teacher_prediction_type, student_prediction_type):
    """Check a teacher/student pair; (student, its prediction type). The student defaults to a
    copy of the teacher, reading its output the same way (the paper's initialisation)."""
    _check_model("teacher", teacher)
    for name, p in (("teacher_prediction_type", teacher_prediction_type),
                    ("student_prediction_type", student_prediction_type)):
        if p is not None and p not in PREDICTIONS:
            raise ValueError(f"{name} must be one of {tuple(PREDICTIONS)}, got {p!r}")
    student_prediction_type = student_prediction_type or teacher_prediction_type
    if student is None:
        if not isinstance(teacher, nn.Module):
            raise ValueError("student is required when the teacher is not a torch.nn.Module to copy")
        if student_prediction_type != teacher_prediction_type:
            raise ValueError("a student copied from the teacher must read its output the same way: "
                             f"teacher_prediction_type={teacher_prediction_type!r}, student_prediction_type="
                             f"{student_prediction_type!r}; pass a student to change the parameterisation")
        # A frozen teacher (requires_grad False, as loaded for inference) gives a trainable copy.
        student = copy.deepcopy(teacher).train().requires_grad_(True)
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False)
    return student, student_prediction_type


class _Trainer:
    """Shared machinery: data draw, optimizer, loop, progress, state to/from a file.

    Subclasses implement ``loss(x0) -> scalar`` and may extend ``_extra_state`` /
    ``_load_extra_state`` and ``_after_step``.
    """

    def __init__(self, student: nn.Module, schedule, *, batch_size: int, lr: float, grad_clip: Optional[float],
                 seed: int, device, optimizer: Optional[Callable] = None, weighting: str = "uniform"):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module (it is trained), got {type(student).__name__}")
        _check_positive_int("batch_size", batch_size)
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
        self.schedule = Schedule.coerce(schedule)
        self.device = torch.device(device) if device is not None else next(student.parameters()).device
        self.student = student.to(self.device)
        self.batch_size, self.lr, self.grad_clip = int(batch_size), float(lr), grad_clip
        self._make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=self.lr))
        self.optimizer = self._make_optimizer(self.student.parameters())
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.history: List[Dict[str, float]] = []

    # -- data -------------------------------------------------------------------------------
    def draw(self, data: Data) -> torch.Tensor:
        """A batch of x0: rows of ``data`` drawn with replacement, or ``data(batch_size, generator)``."""
        if isinstance(data, torch.Tensor):
            if data.dim() < 2 or data.shape[0] == 0:
                raise ValueError(f"data must be a [N, ...] tensor of training samples with N > 0, got {tuple(data.shape)}")
            idx = torch.randint(0, data.shape[0], (self.batch_size,), generator=self.generator, device=self.device)
            # Gather where the data lives, then move only the batch (a dataset on the host stays there).
            return data[idx.to(data.device)].to(self.device).float()
        if callable(data):
            x0 = data(self.batch_size, self.generator)
            if not isinstance(x0, torch.Tensor) or x0.shape[0] != self.batch_size:
                raise ValueError(f"data(batch_size, generator) must return a tensor with {self.batch_size} rows")
            return x0.to(self.device).float()
        raise TypeError(f"data must be a tensor or a callable (batch_size, generator) -> tensor, got {type(data).__name__}")

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, device=self.device, dtype=x.dtype)

    # -- one optimisation step ----------------------------------------------------------------
    def loss(self, x0: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_step(self, data: Data) -> float:
        self.student.train()
        loss = self.loss(self.draw(data))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        self._after_step()
        # One host read per optimisation step, for progress: training is not a sampling loop.
        return float(loss.detach())

    def _after_step(self) -> None:
        pass

    def _train_until(self, data, stop, fields, bar, callback, state_path, save_every):
        """Iterate until ``self.iteration == stop``; returns (sum of losses, iterations run).
        ``callback`` gets ``fields`` plus the iteration and its loss; the state file is written
        every ``save_every`` iterations."""
        total, count = 0.0, 0
        while self.iteration < stop:
            value = self.train_step(data)
            self.iteration += 1
            total, count = total + value, count + 1
            if callback is not None:
                callback({**fields, "iteration": self.iteration, "loss": value})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}")
            if state_path and save_every and self.iteration % save_every == 0:
                self.save(state_path)
        if bar is not None:
            bar.close()
        return total, count

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "history": list(self.history), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self._load_extra_state(state)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        # torch.load(map_location=cuda) moves the saved state to the GPU; set_state wants a CPU ByteTensor.
        self.generator.set_state(state["generator"].cpu())
        self.history = list(state["history"])

    def save(self, path: str) -> None:
        """Write the whole training state (resume with ``load``)."""
        torch.save(self.state_dict(), path)

    def load(self, path: str) -> "_Trainer":
        """Restore a state written by ``save``; the next ``fit`` continues where it stopped."""
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        return self

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    @staticmethod
    def _progress_bar(total, desc, progress):
        if not progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc)


class ProgressiveDistillation(_Trainer):
    """Distil ``teacher`` (DDIM, eta = 0, ``teacher_steps`` steps) into ``student`` by halving rounds
    down to ``final_steps``. Both are called as ``model(x_t, t)`` with int64 timesteps [B].

    * ``teacher_prediction_type`` / ``student_prediction_type``: how their outputs are read
      ("epsilon", "v_prediction", "sample"); the paper recommends v or x0 for the student, whose
      x0 must stay finite where alpha_t -> 0.
    * ``student``: defaults to a copy of the teacher (the paper's initialisation; the prediction
      types must then agree).
    * ``weighting``: "truncated_snr" (max(SNR, 1) on the x0 error), "snr+1" or "uniform".
    * ``data``: passed to ``fit``: a [N, ...] tensor of training samples or a callable
      ``(batch_size, generator) -> x0``.

    ``fit`` runs all remaining rounds; ``state_path`` checkpoints every ``save_every`` iterations
    and at the end of each round, and a new trainer ``load``-ing it resumes exactly.
    ``sampler()`` returns the DDIM sampler that runs the current student at its step count.
    """

    def __init__(self, teacher: Callable, student: Optional[nn.Module] = None, schedule=None, *,
                 teacher_prediction_type: str = "epsilon", student_prediction_type: Optional[str] = None,
                 teacher_steps: int = 64, final_steps: int = 2, iters_per_round: int = 1000, batch_size: int = 128,
                 lr: float = 1e-4, weighting: str = "truncated_snr", timestep_spacing: str = "trailing",
                 grad_clip: Optional[float] = 1.0, optimizer: Optional[Callable] = None, seed: int = 0,
                 device=None):
        student, student_prediction_type = resolve_student(teacher, student, teacher_prediction_type,
                                                           student_prediction_type)
        _check_positive_int("teacher_steps", teacher_steps, 2)
        _check_positive_int("final_steps", final_steps)
        _check_positive_int("iters_per_round", iters_per_round)
        if teacher_steps % final_steps or (teacher_steps // final_steps) & (teacher_steps // final_steps - 1):
            raise ValueError(f"teacher_steps / final_steps must be a power of two >= 2 (each round halves the "
                             f"step count), got teacher_steps={teacher_steps}, final_steps={final_steps}")
        if teacher_steps == final_steps:
            raise ValueError(f"final_steps must be smaller than teacher_steps, got {final_steps} and {teacher_steps}")
        super().__init__(student, schedule, batch_size=batch_size, lr=lr, grad_clip=grad_clip, seed=seed,
                         device=device, optimizer=optimizer, weighting=weighting)
        self.base_teacher = teacher
        self.teacher = teacher
        self.teacher_prediction_type = teacher_prediction_type
        self.student_prediction_type = student_prediction_type
        self.teacher_steps, self.final_steps = int(teacher_steps), int(final_steps)
        self.iters_per_round = int(iters_per_round)
        self.timestep_spacing = timestep_spacing
        # The full 2N grid of the first teacher; every later grid is every 2^r-th point of it, so
        # the grids nest whatever the spacing rule.
        self.base_timesteps = self.schedule.timesteps(self.teacher_steps, timestep_spacing)
        self.round = 0
        self.iteration = 0
        self._set_round(0)

    # -- rounds ------------------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        return int(round(math.log2(self.teacher_steps // self.final_steps)))

    @property
    def student_steps(self) -> int:
        """The step count the student is being trained for in the current round."""
        return self.teacher_steps >> (min(self.round, self.rounds - 1) + 1)

    @property
    def student_timesteps(self) -> np.ndarray:
        return self.base_timesteps[:: self.teacher_steps // self.student_steps]

    @property
    def done(self) -> bool:
        return self.round >= self.rounds

    def _set_round(self, r: int) -> None:
        self.round = r
        if self.done:
            return
        stride = self.teacher_steps // (2 * self.student_steps)
        self.teacher_grid = StepGrid(self.schedule, self.base_timesteps[::stride], self.device)

    def _advance_round(self) -> None:
        """The student becomes the (frozen) teacher; the student keeps training from its weights."""
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.teacher_prediction_type = self.student_prediction_type
        self.iteration = 0
        self.optimizer = self._make_optimizer(self.student.parameters())
        self._set_round(self.round + 1)

    # -- the objective -------------------------------------------------------------------------
    def _call(self, model, x, t):
        return model(x, t)

    @torch.no_grad()
    def targets(self, x_t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """x_target for student-grid step indices ``i`` [B] from noisy inputs x_t (see module doc)."""
        g = self.teacher_grid
        j = 2 * i
        was_training = getattr(self.teacher, "training", False)
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
        x_mid, _ = ddim_step(x_t, self._call(self.teacher, x_t, g.t[j]), g.alpha[j], g.sigma[j], g.alpha[j + 1],
                             g.sigma[j + 1], self.teacher_prediction_type)
        # The midpoint j+1 is always a real timestep (2N-grid index < 2N), so g.t[j + 1] exists.
        x_end, _ = ddim_step(x_mid, self._call(self.teacher, x_mid, g.t[j + 1]), g.alpha[j + 1], g.sigma[j + 1],
                             g.alpha[j + 2], g.sigma[j + 2], self.teacher_prediction_type)
        if was_training:
            self.teacher.train()
        ratio = g.sigma[j + 2] / g.sigma[j]
        return (x_end - _bc(ratio, x_t) * x_t) / _bc(g.alpha[j + 2] - ratio * g.alpha[j], x_t)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        g = self.teacher_grid
        i = torch.randint(0, self.student_steps, (x0.shape[0],), generator=self.generator, device=self.device)
        j = 2 * i
        alpha, sigma = g.alpha[j], g.sigma[j]
        x_t = _bc(alpha, x0) * x0 + _bc(sigma, x0) * self.randn_like(x0)
        target = self.targets(x_t, i)
        x0_hat, _ = x0_eps(x_t, self._call(self.student, x_t, g.t[j]), alpha, sigma, self.student_prediction_type)
        err = (x0_hat - target).square().flatten(1).mean(1)
        return (loss_weight(alpha, sigma, self.weighting) * err).mean()

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, data: Data, *, state_path: Optional[str] = None, save_every: int = 0, progress: bool = False,
            callback: Optional[Callable[[dict], None]] = None, max_iters: Optional[int] = None) -> nn.Module:
        """Run the remaining rounds (or ``max_iters`` iterations, to stop early and resume later).
        ``callback(record)`` gets {"round", "steps", "iteration", "loss"} after every iteration.
        Returns the student."""
        budget = math.inf if max_iters is None else int(max_iters)
        while not self.done and budget > 0:
            bar = self._progress_bar(self.iters_per_round, f"distil {2 * self.student_steps}->{self.student_steps} steps",
                                     progress)
            if bar is not None:
                bar.update(self.iteration)
            stop = int(min(self.iters_per_round, self.iteration + budget))
            total, count = self._train_until(data, stop, {"round": self.round, "steps": self.student_steps}, bar,
                                             callback, state_path, save_every)
            budget -= count
            if count:
                self.history.append({"round": self.round, "steps": self.student_steps, "iterations": count,
                                     "mean_loss": total / count})
            if self.iteration >= self.iters_per_round:
                self._advance_round()
            if state_path:
                self.save(state_path)
        return self.student

    def sampler(self, **kw):
        """A DDIM sampler (eta = 0) that runs the trained student at its step count."""
        from .samplers import DDIMSampler
        steps = self.final_steps if self.done else self.student_steps
        ts = self.base_timesteps[:: self.teacher_steps // steps]
        return DDIMSampler(self.schedule, None, timesteps=ts, prediction_type=self.student_prediction_type, **kw)

    # -- state -------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        teacher = None if self.teacher is self.base_teacher else self.teacher.state_dict()
        return {"kind": "progressive_distillation", "round": self.round, "iteration": self.iteration,
                "teacher_steps": self.teacher_steps, "final_steps": self.final_steps,
                "base_timesteps": self.base_timesteps.tolist(), "teacher": teacher,
                "teacher_prediction_type": self.teacher_prediction_type}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("kind") != "progressive_distillation":
            raise ValueError(f"not a progressive-distillation state (kind={state.get('kind')!r})")
        if (state["teacher_steps"], state["final_steps"]) != (self.teacher_steps, self.final_steps) or \
                list(state["base_timesteps"]) != self.base_timesteps.tolist():
            raise ValueError("the saved state was made with different teacher_steps / final_steps / timesteps: "
                             f"saved {state['teacher_steps']} -> {state['final_steps']}, "
                             f"this trainer {self.teacher_steps} -> {self.final_steps}")
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        else:
            self.teacher = self.base_teacher
        self.teacher_prediction_type = state["teacher_prediction_type"]
        self._set_round(state["round"])
        self.iteration = state["iteration"]
        self.optimizer = self._make_optimizer(self.student.parameters())

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

``fastdiff.training.trainer.Trainer`` holds the loop, the data draw, checkpointing and progress
reporting that every trainer shares.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from ..engine.predictions import x0_eps
from ..samplers.vp import DDIMSampler
from .trainer import Data, StepGrid, Trainer, bc, check_positive_int, ddim_step, loss_weight, resolve_student


class MLPDenoiser(nn.Module):
    """A small time-conditioned MLP for flat data [B, dim] (a student for low-dimensional
    problems such as the analytic test bed): input (x_t, sin/cos features of the timestep)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, n_freq: int = 16, num_train_timesteps: int = 1000):
        super().__init__()
        check_positive_int("dim", dim)
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


class ProgressiveDistillation(Trainer):
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
        check_positive_int("teacher_steps", teacher_steps, 2)
        check_positive_int("final_steps", final_steps)
        check_positive_int("iters_per_round", iters_per_round)
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
        return (x_end - bc(ratio, x_t) * x_t) / bc(g.alpha[j + 2] - ratio * g.alpha[j], x_t)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        g = self.teacher_grid
        i = torch.randint(0, self.student_steps, (x0.shape[0],), generator=self.generator, device=self.device)
        j = 2 * i
        alpha, sigma = g.alpha[j], g.sigma[j]
        x_t = bc(alpha, x0) * x0 + bc(sigma, x0) * self.randn_like(x0)
        target = self.targets(x_t, i)
        x0_hat, _ = x0_eps(x_t, self._call(self.student, x_t, g.t[j]), bc(alpha, x_t), bc(sigma, x_t),
                           self.student_prediction_type)
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
            bar = self.progress_bar(self.iters_per_round, f"distil {2 * self.student_steps}->{self.student_steps} steps",
                                     progress)
            if bar is not None:
                bar.update(self.iteration)
            stop = int(min(self.iters_per_round, self.iteration + budget))
            total, count = self.train_until(data, stop, {"round": self.round, "steps": self.student_steps}, bar,
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

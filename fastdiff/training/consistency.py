"""Consistency distillation (Song, Dhariwal, Chen & Sutskever, "Consistency Models", ICML 2023,
Algorithm 2) on a discrete VP schedule; the student samples with
``fastdiff.samplers.consistency.ConsistencySampler`` (Algorithm 1). On a grid of N teacher times, for x_t = sqrt(ab_t) x + sigma_t z at grid time t and its successor s (the data after
  the last grid time), one teacher DDIM step gives x_hat_s and the loss is

      w(t) d(f_theta(x_t, t), f_theta-(x_hat_s, s)),     f_theta-(x, data) = x (the boundary),

  with theta- an exponential moving average of theta (the target network, decay ``target_decay``)
  and d the squared L2 or pseudo-Huber distance (Song & Dhariwal, 2023). f is the student's
  x0 estimate; with a v- or x0-parameterised network it tends to x as t -> 0, as the boundary
  condition asks.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..engine.predictions import x0_eps
from ..samplers.consistency import ConsistencySampler
from .trainer import Data, StepGrid, Trainer, bc, check_positive_int, ddim_step, loss_weight, resolve_student

DISTANCES = ("l2", "pseudo_huber")


class ConsistencyDistillation(Trainer):
    """Consistency distillation of ``teacher`` into ``student`` (default: a copy of the teacher).

    * ``grid_steps``: N, the number of teacher DDIM steps the ODE is discretised into (timesteps
      by ``timestep_spacing``); the student learns to map every point of a teacher trajectory on
      that grid to its end.
    * ``target_decay``: EMA decay of the target network theta- (0.95 in Song et al. for CD on
      CIFAR-10 with N = 18).
    * ``distance``: "l2" (mean squared error) or "pseudo_huber" (sqrt(|d|^2 + c^2) - c with
      c = 0.00054 sqrt(dim), Song & Dhariwal 2023); ``weighting`` as in ``fastdiff.training.distill``
      ("uniform" is the paper's lambda = 1).

    ``fit(data, iters)`` trains; ``save``/``load`` write and restore the whole state;
    ``sampler(steps)`` returns a ``ConsistencySampler`` for the student.
    """

    def __init__(self, teacher: Callable, student: Optional[nn.Module] = None, schedule=None, *,
                 teacher_prediction_type: str = "epsilon", student_prediction_type: Optional[str] = None,
                 grid_steps: int = 64, timestep_spacing: str = "trailing", target_decay: float = 0.95,
                 distance: str = "l2", weighting: str = "uniform", batch_size: int = 128, lr: float = 1e-4,
                 grad_clip: Optional[float] = 1.0, optimizer: Optional[Callable] = None, seed: int = 0, device=None):
        student, student_prediction_type = resolve_student(teacher, student, teacher_prediction_type,
                                                           student_prediction_type)
        check_positive_int("grid_steps", grid_steps, 2)
        if not (isinstance(target_decay, (int, float)) and 0.0 <= target_decay < 1.0):
            raise ValueError(f"target_decay must lie in [0, 1), got {target_decay!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        super().__init__(student, schedule, batch_size=batch_size, lr=lr, grad_clip=grad_clip, seed=seed,
                         device=device, optimizer=optimizer, weighting=weighting)
        self.teacher = teacher
        self.teacher_prediction_type, self.student_prediction_type = teacher_prediction_type, student_prediction_type
        self.grid_steps, self.timestep_spacing = int(grid_steps), timestep_spacing
        self.target_decay, self.distance = float(target_decay), distance
        self.grid = StepGrid(self.schedule, self.schedule.timesteps(self.grid_steps, timestep_spacing), self.device)
        self.target = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.iteration = 0

    def consistency_fn(self, model, x_t, idx):
        """f(x_t, t) = the x0 estimate of ``model`` at grid indices ``idx`` [B]."""
        g = self.grid
        return x0_eps(x_t, model(x_t, g.t[idx]), bc(g.alpha[idx], x_t), bc(g.sigma[idx], x_t),
                      self.student_prediction_type)[0]

    def _distance(self, a, b):
        d2 = (a - b).square().flatten(1)
        if self.distance == "l2":
            return d2.mean(1)
        c = 0.00054 * math.sqrt(d2.shape[1])
        return (d2.sum(1) + c * c).sqrt() - c

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        g = self.grid
        n = torch.randint(0, self.grid_steps, (x0.shape[0],), generator=self.generator, device=self.device)
        alpha, sigma = g.alpha[n], g.sigma[n]
        x_t = bc(alpha, x0) * x0 + bc(sigma, x0) * self.randn_like(x0)
        with torch.no_grad():
            # The teacher integrates the ODE: evaluation mode (no dropout / batch-norm updates).
            was_training = isinstance(self.teacher, nn.Module) and self.teacher.training
            if was_training:
                self.teacher.eval()
            x_s, _ = ddim_step(x_t, self.teacher(x_t, g.t[n]), alpha, sigma, g.alpha[n + 1], g.sigma[n + 1],
                               self.teacher_prediction_type)
            if was_training:
                self.teacher.train()
            # Successor n + 1 == grid_steps is the data: the target is x_hat_s itself (f(x, 0) = x).
            # The target network is evaluated at a valid timestep for every row and then masked,
            # so the batch needs no host-side split.
            last = n + 1 >= self.grid_steps
            target = torch.where(bc(last, x_s).bool(), x_s,
                                 self.consistency_fn(self.target, x_s, torch.clamp(n + 1, max=self.grid_steps - 1)))
        pred = self.consistency_fn(self.student, x_t, n)
        return (loss_weight(alpha, sigma, self.weighting) * self._distance(pred, target)).mean()

    @torch.no_grad()
    def _after_step(self) -> None:
        for pt, ps in zip(self.target.parameters(), self.student.parameters()):
            pt.lerp_(ps, 1.0 - self.target_decay)
        for bt, bs in zip(self.target.buffers(), self.student.buffers()):
            bt.copy_(bs)

    def fit(self, data: Data, iters: int, *, state_path: Optional[str] = None, save_every: int = 0,
            progress: bool = False, callback: Optional[Callable[[dict], None]] = None) -> nn.Module:
        """Train until ``iters`` iterations in total (a resumed trainer continues its count).
        ``callback(record)`` gets {"iteration", "loss"} after every iteration. Returns the student."""
        check_positive_int("iters", iters)
        bar = self.progress_bar(iters, "consistency distillation", progress)
        if bar is not None:
            bar.update(min(self.iteration, iters))
        total, count = self.train_until(data, iters, {}, bar, callback, state_path, save_every)
        if count:
            self.history.append({"iterations": count, "mean_loss": total / count})
        if state_path:
            self.save(state_path)
        return self.student

    def sampler(self, steps: int = 2, **kw) -> ConsistencySampler:
        """A ConsistencySampler running the student in ``steps`` steps (spacing as the grid's)."""
        kw.setdefault("timestep_spacing", self.timestep_spacing)
        return ConsistencySampler(self.schedule, steps, prediction_type=self.student_prediction_type, **kw)

    def _extra_state(self) -> dict:
        return {"kind": "consistency_distillation", "iteration": self.iteration, "target": self.target.state_dict(),
                "grid_steps": self.grid_steps}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("kind") != "consistency_distillation":
            raise ValueError(f"not a consistency-distillation state (kind={state.get('kind')!r})")
        if state["grid_steps"] != self.grid_steps:
            raise ValueError(f"the saved state used grid_steps={state['grid_steps']}, this trainer {self.grid_steps}")
        self.target.load_state_dict(state["target"])
        self.iteration = state["iteration"]

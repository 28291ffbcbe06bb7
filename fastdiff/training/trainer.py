"""What every trainer in fastdiff shares: batches of x0, per-sample path coefficients on a step
grid, the deterministic DDIM step teachers take, loss weights, and ``Trainer`` (optimiser loop,
progress, the whole state to and from one file). Progressive distillation, consistency
distillation and the OCM head trainer are subclasses that define ``loss(x0)``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from ..engine.predictions import PREDICTIONS, x0_eps
from ..engine.schedule import FlowSchedule, Schedule

WEIGHTINGS = ("truncated_snr", "snr+1", "uniform")

Data = Union[torch.Tensor, Callable[[int, torch.Generator], torch.Tensor]]


def bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] vector shaped to broadcast over x's trailing dimensions."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


def ddim_step(x, out, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type):
    """Deterministic DDIM step (eta = 0) with per-sample coefficients:
    x_s = alpha_s x0_hat + sigma_s eps_hat. Returns (x_s, x0_hat)."""
    x0, eps = x0_eps(x, out, bc(alpha_t, x), bc(sigma_t, x), prediction_type)
    return bc(alpha_s, x) * x0 + bc(sigma_s, x) * eps, x0


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


def check_model(name, model):
    if not callable(model):
        raise TypeError(f"{name} must be callable as model(x_t, t), got {type(model).__name__}")


def check_positive_int(name, v, minimum=1):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def resolve_student(teacher, student, teacher_prediction_type, student_prediction_type):
    """Check a teacher/student pair; (student, its prediction type). The student defaults to a
    copy of the teacher, reading its output the same way (the paper's initialisation)."""
    check_model("teacher", teacher)
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


class Trainer:
    """Shared machinery: data draw, optimizer, loop, progress, state to/from a file.

    Subclasses implement ``loss(x0) -> scalar`` and may extend ``_extra_state`` /
    ``_load_extra_state`` and ``_after_step``.
    """

    def __init__(self, student: nn.Module, schedule, *, batch_size: int, lr: float, grad_clip: Optional[float],
                 seed: int, device, optimizer: Optional[Callable] = None, weighting: str = "uniform"):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module (it is trained), got {type(student).__name__}")
        check_positive_int("batch_size", batch_size)
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
        # A FlowSchedule is kept as it is (the OCM head trainer runs on the flow path too); anything
        # else is a VP schedule.
        self.schedule = schedule if isinstance(schedule, FlowSchedule) else Schedule.coerce(schedule)
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

    def train_until(self, data, stop, fields, bar, callback, state_path, save_every):
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

    def load(self, path: str) -> "Trainer":
        """Restore a state written by ``save``; the next ``fit`` continues where it stopped."""
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        return self

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    @staticmethod
    def progress_bar(total, desc, progress):
        if not progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc)

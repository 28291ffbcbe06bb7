"""What a model's output means: the one conversion between a prediction and (x0_hat, eps_hat).

On a Gaussian path x_t = a_t x0 + b_t eps (VP: a = sqrt(alpha_bar), b = sigma; rectified flow:
a = 1 - sigma, b = sigma) a model predicts one of

* ``epsilon``: eps_hat;                      x0_hat = (x_t - b eps_hat) / a
* ``v_prediction``: v = a eps - b x0;         x0_hat = a x_t - b v,  eps_hat = a v + b x_t   (a^2 + b^2 = 1)
* ``sample``: x0_hat;                         eps_hat = (x_t - a x0_hat) / b
* ``flow_prediction``: u = eps - x0;          x0_hat = x_t - b u,    eps_hat = x_t + a u      (a + b = 1)

The fused kernel does the same arithmetic in the same order (fastdiff/engine/kernels/fused_step.py);
``x0_eps`` is what its torch reference, training objectives and the test bed call, with ``a``
and ``b`` 0-d tensors (one step for the batch) or broadcastable [B, 1, ...] ones (one per sample).
"""
from __future__ import annotations

import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")
PREDICTION_CODES = {name: i for i, name in enumerate(PREDICTIONS)}
# What each path can read: v assumes a^2 + b^2 = 1, a velocity a + b = 1.
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTIONS = ("flow_prediction", "epsilon", "sample")


def check_prediction(prediction_type, name: str = "prediction_type") -> str:
    if prediction_type not in PREDICTION_CODES:
        raise ValueError(f"{name} must be one of {PREDICTIONS}, got {prediction_type!r}")
    return prediction_type


def x0_eps(x: torch.Tensor, out: torch.Tensor, a, b, prediction_type: str):
    """(x0_hat, eps_hat) from model output ``out`` at x_t = ``x``; ``a``, ``b`` the path's
    coefficients at t. Fresh tensors (eps_hat may be ``out`` itself for an epsilon model).
    In-place ops where they save a pass; folding the update into p x_t + q out would save more
    but loses 2-3x precision when 1/a is large (t near T)."""
    if prediction_type == "epsilon":
        return torch.addcmul(x, out, -b).div_(a), out
    if prediction_type == "v_prediction":
        return torch.addcmul(a * x, out, -b), torch.addcmul(a * out, x, b)
    if prediction_type == "sample":
        return out, torch.addcmul(x, out, -a).div_(b)
    if prediction_type == "flow_prediction":
        return torch.addcmul(x, out, -b), torch.addcmul(x, out, a)
    raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")


def model_output(x0: torch.Tensor, eps: torch.Tensor, a, b, prediction_type: str) -> torch.Tensor:
    """The inverse: what a perfect model of ``prediction_type`` outputs for (x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - b * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")

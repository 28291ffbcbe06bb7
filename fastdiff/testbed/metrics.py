"""Sample-quality metrics against exact samples: Frechet distance of fitted Gaussians, sliced
Wasserstein-2, and the per-mode weight error of a mixture."""
from __future__ import annotations

import torch

__all__ = ["frechet_distance", "sliced_wasserstein", "mode_weight_error"]


def _flat2(x, name):
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a tensor [n >= 2, ...] of samples")
    return x.reshape(x.shape[0], -1).double()


def _sqrtm_psd(m):
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of Gaussians fitted to two
    sample sets [n, ...] (the FID formula, on raw coordinates)."""
    a, b = _flat2(a, "a"), _flat2(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    sa = _sqrtm_psd(ca)
    cross = _sqrtm_psd(sa @ cb @ sa)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * torch.trace(cross))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance: sqrt of the mean over random unit directions of the squared
    W2 between the 1-d projections (exact 1-d W2 by sorting; equal sample counts required)."""
    a, b = _flat2(a, "a"), _flat2(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape [n, dim], got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    dirs = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a @ dirs.to(a.device), dim=0).values
    pb = torch.sort(b @ dirs.to(b.device), dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mode_weight_error(mixture, x0: torch.Tensor) -> float:
    """Total-variation distance between the weights of ``mixture`` (a testbed GaussianMixture)
    and the fraction of samples assigned to each mode: 0.5 * sum_k |frac_k - w_k|."""
    labels = mixture.assign(x0)
    frac = torch.bincount(labels, minlength=mixture.n_components).double() / labels.numel()
    return float(0.5 * (frac - mixture.weights.double().to(frac.device)).abs().sum())

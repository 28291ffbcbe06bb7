"""The analytic test bed (fastdiff.testbed) against Monte Carlo, finite differences of its own
log-density, and Tweedie's identities; the sample-quality metrics against closed forms."""
import math

import pytest
import torch

from fastdiff import DDIMSampler, Schedule
from fastdiff.testbed import GaussianMixture, frechet_distance, mode_weight_error, sliced_wasserstein


def _mixture2d():
    # Three overlapping modes in 2-d with scales from 0.05 to 0.4.
    return GaussianMixture([0.5, 0.3, 0.2], [[0.3, -0.2], [-0.4, 0.5], [0.1, 0.6]],
                           [[0.05, 0.2], [0.4, 0.1], [0.15, 0.15]])


def _points(gm, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    return gm.sample_xt(n, t, g)[1]


@pytest.mark.parametrize("t", [100, 400, 800])
def test_posterior_moments_match_importance_sampling(t):
    """E[x0|x_t] and diag Cov[x0|x_t] against a self-normalised importance-sampling estimate:
    x0 ~ p0 (exact sampler) weighted by N(x_t; sqrt(ab) x0, sigma^2), written here from scratch."""
    gm = _mixture2d()
    ab = float(gm.schedule.alphas_cumprod[t])
    x0 = gm.sample_x0(400_000, torch.Generator().manual_seed(1))
    xt = _points(gm, t, 4, seed=2)
    logw = -0.5 * ((xt[:, None, :] - math.sqrt(ab) * x0[None]) ** 2).sum(-1) / (1 - ab)  # [4, N]
    w = torch.softmax(logw, dim=1)
    ess = 1.0 / (w ** 2).sum(1)
    assert bool((ess > 2000).all()), f"importance sampling degenerate (ESS {ess})"
    mean_is = w @ x0
    var_is = w @ x0 ** 2 - mean_is ** 2
    mean, var = gm.x0_mean(xt, t), gm.x0_var(xt, t)
    # Standard error of a self-normalised IS mean ~ sqrt(var / ESS); 6 SE bounds.
    se = (var / ess[:, None]).sqrt()
    assert bool(((mean - mean_is).abs() < 6 * se).all()), (mean, mean_is, se)
    assert bool(((var - var_is).abs() < 6 * var * (2.0 / ess[:, None]).sqrt() + 1e-12).all()), (var, var_is)


def test_regression_identities_on_sampled_pairs():
    """On pairs (x0, eps, x_t) from the forward process: x0 - E[x0|x_t] and eps - E[eps|x_t] have
    mean zero and are uncorrelated with x_t; E[(x0 - E[x0|x_t])^2] = E[Var[x0|x_t]]."""
    gm = GaussianMixture.random(3, 4, seed=5)
    g = torch.Generator().manual_seed(3)
    n = 200_000
    t = torch.randint(0, 1000, (n,), generator=g)
    x0, xt, eps = gm.sample_xt(n, t, g)
    r0 = x0 - gm.x0_mean(xt, t)
    re = eps - gm.eps(xt, t)
    var = gm.x0_var(xt, t)
    for resid in (r0, re):
        for f in (torch.ones_like(xt), xt):
            prod = resid * f
            se = prod.std(0) / math.sqrt(n)
            assert bool((prod.mean(0).abs() < 5 * se).all())
    d = r0 ** 2 - var
    assert bool((d.mean(0).abs() < 5 * d.std(0) / math.sqrt(n)).all())


@pytest.mark.parametrize("t", [20, 300, 900])
def test_score_and_hessian_match_finite_differences_of_log_prob(t):
    gm = GaussianMixture.random(3, 3, std_range=(0.05, 0.3), seed=7)
    x = _points(gm, t, 5, seed=4)
    lp = lambda z: gm.log_prob(z, t)  # noqa: E731
    ab = float(gm.schedule.alphas_cumprod[t])
    step = 1e-3 * math.sqrt(ab * 0.05 ** 2 + 1 - ab)  # small against the narrowest width of p_t
    score, hess = gm.score(x, t), gm.hessian_diag(x, t)
    for d in range(3):
        e = torch.zeros_like(x)
        e[:, d] = step
        fp, f0, fm = lp(x + e), lp(x), lp(x - e)
        fd_grad = (fp - fm) / (2 * step)
        fd_hess = (fp - 2 * f0 + fm) / step ** 2
        torch.testing.assert_close(score[:, d], fd_grad, rtol=1e-6, atol=1e-6 / step)
        # roundoff of the second difference ~ 1e-16 |log p| / step^2; truncation ~ step^2.
        torch.testing.assert_close(hess[:, d], fd_hess, rtol=1e-5, atol=1e-11 / step ** 2)


def test_tweedie_identities_hold_exactly():
    gm = GaussianMixture.random(6, 5, seed=11)
    t = torch.tensor([0, 1, 50, 250, 500, 750, 999, 999])
    x = _points(gm, t, 8, seed=5)
    ab = gm.schedule.alphas_cumprod[t][:, None]
    sig2 = 1 - ab
    x0 = gm.x0_mean(x, t)
    torch.testing.assert_close(x0, (x + sig2 * gm.score(x, t)) / ab.sqrt(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm.eps(x, t), (x - ab.sqrt() * x0) / sig2.sqrt(), rtol=1e-8, atol=1e-8)
    # Second-order Tweedie: Cov[x0|x_t] = (sigma^2/ab)(1 + h). 1 + h cancels near t = 0 (h ~ -1),
    # so the bound is relative to the size of the two terms.
    h = gm.h(x, t)
    var = gm.x0_var(x, t)
    assert bool(((var - sig2 / ab * (1 + h)).abs() <= 1e-9 * sig2 / ab * (1 + h.abs())).all())
    torch.testing.assert_close(h, sig2 * gm.hessian_diag(x, t), rtol=1e-12, atol=1e-12)
    e2, h2 = gm.eps_and_h(x, t)
    torch.testing.assert_close(e2, gm.eps(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-12)
    v = gm.v(x, t)
    torch.testing.assert_close(v, ab.sqrt() * gm.eps(x, t) - sig2.sqrt() * x0, rtol=1e-12, atol=1e-12)
    assert bool((var > 0).all()) and bool((h >= -1 - 1e-9).all())


def test_stable_far_from_every_mode():
    """log-sum-exp responsibilities: a point 50 widths away gives finite values, no NaN."""
    gm = GaussianMixture.random(4, 3, std_range=(0.005, 0.01), seed=1)
    x = torch.full((2, 4), 5.0, dtype=torch.float64)
    for f in (gm.eps, gm.x0_mean, gm.x0_var, gm.h, gm.score, gm.log_prob):
        assert bool(torch.isfinite(f(x, 0)).all()), f.__name__


def test_float32_mixture_agrees_with_float64():
    gm64 = GaussianMixture.random(5, 3, seed=2)
    gm32 = GaussianMixture(gm64.weights, gm64.means, gm64.stds, dtype=torch.float32)
    x = _points(gm64, 500, 16, seed=1)
    t = torch.full((16,), 500)
    torch.testing.assert_close(gm32.eps(x.float(), t).double(), gm64.eps(x, t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm32.h(x.float(), t).double(), gm64.h(x, t), rtol=1e-3, atol=1e-4)


def test_exact_sampler_moments_and_labels():
    w = torch.tensor([0.2, 0.8], dtype=torch.float64)
    mu = torch.tensor([[-1.0, 0.5, 0.0], [0.5, 0.0, 0.25]], dtype=torch.float64)
    s = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.05, 0.1]], dtype=torch.float64)
    gm = GaussianMixture(w * 3, mu, s)  # weights are normalised
    n = 200_000
    x, lab = gm.sample_x0(n, torch.Generator().manual_seed(0), return_labels=True)
    mean = (w[:, None] * mu).sum(0)
    var = (w[:, None] * (s ** 2 + mu ** 2)).sum(0) - mean ** 2
    assert bool(((x.mean(0) - mean).abs() < 5 * (var / n).sqrt()).all())
    assert bool(((x.var(0) - var).abs() < 0.02 * var).all())
    assert abs(float((lab == 1).double().mean()) - 0.8) < 5 * math.sqrt(0.16 / n)
    assert float((gm.assign(x) == lab).double().mean()) > 0.99


def test_model_drives_a_sampler_with_image_shapes():
    gm = GaussianMixture.random(12, 3, seed=4)
    x = DDIMSampler(gm.schedule, 20).sample(gm.model(), (64, 3, 2, 2), seed=1)
    assert x.shape == (64, 3, 2, 2) and x.dtype == torch.float32
    # every sample lands near a mode: within 6 stds in every dimension of its assigned mode
    flat = x.reshape(64, 12).double()
    lab = gm.assign(flat)
    z = (flat - gm.means[lab]) / gm.stds[lab]
    assert float(z.abs().max()) < 6
    for pred in ("v_prediction", "sample"):
        m = gm.model(pred)
        xp = DDIMSampler(gm.schedule, 20, prediction_type=pred).sample(m, (64, 3, 2, 2), seed=1)
        torch.testing.assert_close(xp, x, rtol=1e-3, atol=1e-3)


def test_alpha_bar_keyword_equals_discrete_t():
    gm = GaussianMixture.random(3, 2, seed=0, schedule=Schedule("cosine"))
    x = _points(gm, 300, 4, seed=0)
    ab = gm.schedule.alphas_cumprod[300]
    torch.testing.assert_close(gm.h(x, alpha_bar=ab), gm.h(x, 300))
    torch.testing.assert_close(gm.eps(x, alpha_bar=torch.full((4,), float(ab))), gm.eps(x, 300))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture([0.5], [[0.0], [1.0]], 0.1)
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        GaussianMixture([1.0, 1.0], [[0.0], [1.0]], [0.1, 0.0])
    with pytest.raises(ValueError, match="stds must be a scalar"):
        GaussianMixture([1.0, 1.0], [[0.0], [1.0]], [0.1, 0.1, 0.1])
    gm = GaussianMixture.random(4, 2)
    with pytest.raises(ValueError, match="prod\\(shape\\) = dim = 4"):
        gm.eps(torch.zeros(2, 5), 3)
    with pytest.raises(TypeError, match="integer timesteps"):
        gm.eps(torch.zeros(2, 4), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="one entry per sample"):
        gm.eps(torch.zeros(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prediction_type"):
        gm.model("x0")
    with pytest.raises(ValueError, match="std_range"):
        GaussianMixture.random(2, 2, std_range=(0.3, 0.1))


def test_metrics_against_closed_forms():
    g = torch.Generator().manual_seed(0)
    n, d = 100_000, 4
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.tensor([0.25, 1.0, 4.0, 1.0], dtype=torch.float64)
    m = torch.tensor([0.5, 0.0, -1.0, 0.0], dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * c.sqrt() + m
    exact = float((m ** 2).sum() + (1 + c - 2 * c.sqrt()).sum())  # 1.25 + 0.25 + 1 = 2.5
    assert abs(frechet_distance(a, b) - exact) < 0.03 * exact
    # Shifting by delta moves every 1-d projection by delta.u exactly: SW2 = sqrt(mean (delta.u)^2)
    # -> |delta| / sqrt(d) as the number of directions grows.
    delta = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    sw = sliced_wasserstein(a[:2000], a[:2000] + delta, n_projections=4000)
    assert abs(sw - 5.0 / math.sqrt(d)) < 0.05 * 5.0 / math.sqrt(d)
    assert sliced_wasserstein(a[:500], a[:500]) == 0.0
    gm = GaussianMixture([0.25, 0.75], [[-5.0], [5.0]], 0.1)
    x = torch.cat([torch.full((50, 1), -5.0), torch.full((50, 1), 5.0)]).double()
    assert abs(mode_weight_error(gm, x) - 0.25) < 1e-12


def test_out_of_range_time_is_a_clear_error():
    gm = GaussianMixture.random(3, 2, seed=0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t must lie in \[0, num_train_timesteps=1000\)"):
        gm.eps(x, 1000)
    with pytest.raises(ValueError, match=r"t must lie in \[0, num_train_timesteps=1000\)"):
        gm.eps(x, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \[0, 1\]"):
        gm.eps(x, alpha_bar=1.5)

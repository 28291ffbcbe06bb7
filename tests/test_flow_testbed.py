"""The test bed on the rectified-flow path x_t = (1 - sigma) x0 + sigma eps (fastdiff.testbed,
``sigma=``, ``flow_model``, ``flow_head``) against Monte Carlo, finite differences of its own
log-density, Tweedie's identities and the VP map x_t / c; the flow samplers on it; and the
covariance-matching objective on the flow path (fastdiff.training.ocm with a FlowSchedule)."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.engine.schedule import FlowSchedule, Schedule
from fastdiff.testbed import FlowMixtureModel, GaussianMixture, frechet_distance
from fastdiff.training.ocm import MLPHead, ProbeHead, ocm_target, train_head

N_TRAIN = 1000


def _mixture2d():
    # Three overlapping modes in 2-d with scales from 0.05 to 0.4.
    return GaussianMixture([0.5, 0.3, 0.2], [[0.3, -0.2], [-0.4, 0.5], [0.1, 0.6]],
                           [[0.05, 0.2], [0.4, 0.1], [0.15, 0.15]])


def _points(gm, sigma, n, seed):
    return gm.sample_flow_xt(n, sigma, torch.Generator().manual_seed(seed))[1]


@pytest.mark.parametrize("sigma", [0.2, 0.6, 0.9])
def test_flow_posterior_matches_importance_sampling(sigma):
    """E[x0|x_t], diag Cov[x0|x_t] and the velocity E[eps - x0 | x_t] against a self-normalised
    importance-sampling estimate written here: x0 ~ p0 weighted by N(x_t; (1 - sigma) x0, sigma^2),
    eps = (x_t - (1 - sigma) x0) / sigma."""
    gm = _mixture2d()
    a = 1.0 - sigma
    x0 = gm.sample_x0(400_000, torch.Generator().manual_seed(1))
    xt = _points(gm, sigma, 4, seed=2)
    logw = -0.5 * ((xt[:, None, :] - a * x0[None]) ** 2).sum(-1) / sigma ** 2  # [4, N]
    w = torch.softmax(logw, dim=1)
    ess = 1.0 / (w ** 2).sum(1)
    assert bool((ess > 2000).all()), f"importance sampling degenerate (ESS {ess})"
    mean_is = w @ x0
    var_is = w @ x0 ** 2 - mean_is ** 2
    u = (xt[:, None, :] - a * x0[None]) / sigma - x0[None]  # [4, N, 2]
    u_is = (w[:, :, None] * u).sum(1)
    mean, var = gm.x0_mean(xt, sigma=sigma), gm.x0_var(xt, sigma=sigma)
    # Standard error of a self-normalised IS mean ~ sqrt(var / ESS); 6 SE bounds. u = x_t / sigma
    # - x0 / sigma given x_t, so its posterior standard deviation is sqrt(var) / sigma.
    se = (var / ess[:, None]).sqrt()
    assert bool(((mean - mean_is).abs() < 6 * se).all()), (mean, mean_is, se)
    assert bool(((var - var_is).abs() < 6 * var * (2.0 / ess[:, None]).sqrt() + 1e-12).all()), (var, var_is)
    assert bool(((gm.velocity(xt, sigma) - u_is).abs() < 6 * se / sigma).all())


def test_flow_regression_identities_on_sampled_pairs():
    """On triples (x0, eps, x_t) of the flow path with sigma uniform: u - E[u|x_t] and
    x0 - E[x0|x_t] have mean zero and are uncorrelated with x_t (the conditional mean is the L2
    regression), and E[(x0 - E[x0|x_t])^2] = E[Var[x0|x_t]]."""
    gm = GaussianMixture.random(3, 4, seed=5)
    g = torch.Generator().manual_seed(3)
    n = 200_000
    sigma = torch.rand(n, generator=g, dtype=torch.float64)
    x0, xt, eps = gm.sample_flow_xt(n, sigma, g)
    r0 = x0 - gm.x0_mean(xt, sigma=sigma)
    ru = (eps - x0) - gm.velocity(xt, sigma)
    for resid in (r0, ru):
        for f in (torch.ones_like(xt), xt):
            prod = resid * f
            se = prod.std(0) / math.sqrt(n)
            assert bool((prod.mean(0).abs() < 5 * se).all())
    d = r0 ** 2 - gm.x0_var(xt, sigma=sigma)
    assert bool((d.mean(0).abs() < 5 * d.std(0) / math.sqrt(n)).all())


@pytest.mark.parametrize("sigma", [0.02, 0.5, 0.97])
def test_flow_score_and_hessian_match_finite_differences_of_log_prob(sigma):
    gm = GaussianMixture.random(3, 3, std_range=(0.05, 0.3), seed=7)
    x = _points(gm, sigma, 5, seed=4)
    lp = lambda z: gm.log_prob(z, sigma=sigma)  # noqa: E731
    step = 1e-3 * math.sqrt((1 - sigma) ** 2 * 0.05 ** 2 + sigma ** 2)  # small against the narrowest width
    score, hess = gm.score(x, sigma=sigma), gm.hessian_diag(x, sigma=sigma)
    # The density itself: p_t is the mixture of N((1 - sigma) mu_k, (1 - sigma)^2 s_k^2 + sigma^2).
    var = (1 - sigma) ** 2 * gm.stds ** 2 + sigma ** 2
    comp = -0.5 * (((x[:, None] - (1 - sigma) * gm.means[None]) ** 2) / var + torch.log(2 * math.pi * var)).sum(-1)
    torch.testing.assert_close(lp(x), torch.logsumexp(comp + gm.weights.log(), 1), rtol=1e-12, atol=1e-12)
    for d in range(3):
        e = torch.zeros_like(x)
        e[:, d] = step
        fp, f0, fm = lp(x + e), lp(x), lp(x - e)
        torch.testing.assert_close(score[:, d], (fp - fm) / (2 * step), rtol=1e-6, atol=1e-6 / step)
        # roundoff of the second difference ~ 1e-16 |log p| / step^2; truncation ~ step^2.
        torch.testing.assert_close(hess[:, d], (fp - 2 * f0 + fm) / step ** 2, rtol=1e-5, atol=1e-11 / step ** 2)


def test_flow_tweedie_identities_hold_exactly():
    """With g = nabla log p_t: E[x0|x_t] = (x_t + sigma^2 g) / (1 - sigma), E[eps|x_t] = -sigma g,
    E[u|x_t] = -(x_t + sigma g) / (1 - sigma) (a + b = 1), Cov[x0|x_t] = (sigma^2/(1 - sigma)^2)(1 + h),
    h = sigma^2 diag nabla^2 log p_t; and finite values at sigma = 0 and 1."""
    gm = GaussianMixture.random(6, 5, seed=11)
    sigma = torch.tensor([1e-3, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999, 0.3], dtype=torch.float64)
    x = _points(gm, sigma, 8, seed=5)
    s, a = sigma[:, None], 1 - sigma[:, None]
    g = gm.score(x, sigma=sigma)
    x0 = gm.x0_mean(x, sigma=sigma)
    # (x + s^2 g) cancels when s is small and the modes are wide; relative to |x| / a.
    torch.testing.assert_close(x0, (x + s * s * g) / a, rtol=1e-9, atol=1e-12 * float(x.abs().max() / a.min()))
    torch.testing.assert_close(gm.eps(x, sigma=sigma), -s * g, rtol=1e-12, atol=1e-12)
    u = gm.velocity(x, sigma)
    torch.testing.assert_close(u, -(x + s * g) / a, rtol=1e-9, atol=1e-12 / float(a.min()))
    torch.testing.assert_close(u, gm.eps(x, sigma=sigma) - x0, rtol=1e-12, atol=1e-12)
    h = gm.h(x, sigma=sigma)
    var = gm.x0_var(x, sigma=sigma)
    scale = s * s / (a * a)
    # 1 + h cancels near sigma = 0 (h ~ -1): bound relative to the size of the two terms.
    assert bool(((var - scale * (1 + h)).abs() <= 1e-9 * scale * (1 + h.abs())).all())
    torch.testing.assert_close(h, s * s * gm.hessian_diag(x, sigma=sigma), rtol=1e-12, atol=1e-12)
    e2, h2 = gm.eps_and_h(x, sigma=sigma)
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-12)
    assert bool((var > 0).all()) and bool((h >= -1 - 1e-9).all())
    # The ends: at sigma = 0, x_t = x0, u = -x0 = -x_t, no posterior variance; at sigma = 1 the
    # posterior is the prior: E[x0|x_t] is the mixture mean, h = -1 exactly, u = x_t - E[x0].
    x = _points(gm, 0.5, 3, seed=6)
    torch.testing.assert_close(gm.velocity(x, 0.0), -x, rtol=0, atol=1e-15)
    # (x0_var keeps r_j (m_j - mean)^2 of modes whose responsibility is ~1e-200, not exactly 0.)
    assert float(gm.x0_var(x, sigma=0.0).abs().max()) < 1e-15 and float(gm.h(x, sigma=0.0).abs().max()) == 0.0
    prior_mean = (gm.weights[:, None] * gm.means).sum(0)
    torch.testing.assert_close(gm.x0_mean(x, sigma=1.0), prior_mean.expand(3, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.velocity(x, 1.0), x - prior_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm.h(x, sigma=1.0), torch.full_like(x, -1.0), rtol=0, atol=1e-15)


def test_flow_path_is_the_vp_path_at_the_rescaled_state():
    """The hint, derived: y = x_t / c with c = sqrt((1 - sigma)^2 + sigma^2) is
    (1 - sigma)/c x0 + sigma/c eps, a VP state with alpha_bar = (1 - sigma)^2 / c^2, and y is a
    bijection of x_t, so p(x0 | x_t) = p(x0 | y): same posterior mean and covariance. The density
    changes by the Jacobian, log p_t(x_t) = log p_y(y) - dim log c, so the score is the VP score / c
    and the Hessian / c^2; h = sigma^2 H_flow = (sigma/c)^2 H_vp is the same number on both paths.
    Checked here against the flow path computed directly (mixture.py does not use the map)."""
    gm = GaussianMixture.random(4, 3, seed=2)
    for sigma in (0.01, 0.3, 0.5, 0.8, 0.99):
        x = _points(gm, sigma, 16, seed=int(sigma * 100))
        c = math.hypot(1 - sigma, sigma)
        y, ab = x / c, (1 - sigma) ** 2 / c ** 2
        close = dict(rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gm.x0_mean(x, sigma=sigma), gm.x0_mean(y, alpha_bar=ab), **close)
        torch.testing.assert_close(gm.x0_var(x, sigma=sigma), gm.x0_var(y, alpha_bar=ab), **close)
        torch.testing.assert_close(gm.h(x, sigma=sigma), gm.h(y, alpha_bar=ab), **close)
        torch.testing.assert_close(gm.eps(x, sigma=sigma), gm.eps(y, alpha_bar=ab), **close)
        torch.testing.assert_close(gm.score(x, sigma=sigma), gm.score(y, alpha_bar=ab) / c, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(gm.log_prob(x, sigma=sigma), gm.log_prob(y, alpha_bar=ab) - gm.dim * math.log(c),
                                   rtol=1e-12, atol=1e-10)


def test_flow_model_and_head_follow_the_samplers_timestep_convention():
    """flow_model / flow_head read t = sigma * N (float32, as the flow samplers pass it) for the
    schedule's N; every flow prediction type; (output, h) with return_h."""
    gm = GaussianMixture.random(12, 3, seed=4)
    sigma = torch.tensor([0.9, 0.5, 0.123, 0.02], dtype=torch.float64)
    x = _points(gm, sigma, 4, seed=1).reshape(4, 3, 2, 2).float()  # image-shaped, float32
    for n_train in (1000, 500):
        fs = FlowSchedule(num_train_timesteps=n_train)
        t = (sigma * n_train).float()
        s = t.double() / n_train  # the sigma the float32 timestep stands for
        model = gm.flow_model(fs)
        assert isinstance(model, FlowMixtureModel)
        out = model(x, t)
        assert out.shape == x.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, gm.velocity(x.double(), s).float(), rtol=0, atol=0)
        torch.testing.assert_close(gm.flow_head(fs)(x, t), gm.h(x.double(), sigma=s).float(), rtol=0, atol=0)
        torch.testing.assert_close(gm.flow_model(fs, "epsilon")(x, t), gm.eps(x.double(), sigma=s).float(),
                                   rtol=0, atol=0)
        torch.testing.assert_close(gm.flow_model(fs, "sample")(x, t), gm.x0_mean(x.double(), sigma=s).float(),
                                   rtol=0, atol=0)
        u, h = gm.flow_model(fs, return_h=True)(x, t)
        torch.testing.assert_close(u, out, rtol=0, atol=0)
        torch.testing.assert_close(h, gm.flow_head(fs)(x, t), rtol=0, atol=0)
    # A scalar timestep broadcasts over the batch.
    torch.testing.assert_close(gm.flow_model()(x, torch.tensor(400.0)), gm.velocity(x.double(), 0.4).float(),
                               rtol=0, atol=0)


def test_flow_input_errors_name_the_constraint():
    gm = GaussianMixture.random(3, 2, seed=0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sigma \(the flow path's noise level\) must lie in \[0, 1\]"):
        gm.velocity(x, 1.5)
    with pytest.raises(ValueError, match=r"sigma \(the flow path's noise level\) must lie in \[0, 1\]"):
        gm.flow_model()(x, torch.tensor([100.0, 1001.0]))
    with pytest.raises(ValueError, match="give one time"):
        gm.h(x, 10, sigma=0.5)
    with pytest.raises(ValueError, match="one entry per sample"):
        gm.x0_mean(x, sigma=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="v_prediction assumes a\\^2 \\+ b\\^2 = 1"):
        gm.v(x, sigma=0.5)
    with pytest.raises(ValueError, match="prediction_type on the flow path"):
        gm.flow_model(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="flow_prediction is the flow path's output"):
        gm.predict(x, 10, "flow_prediction")
    with pytest.raises(ValueError, match="use flow_model"):
        gm.model("flow_prediction")


def _exact_and_ref(gm, n):
    ref = gm.sample_x0(n, torch.Generator().manual_seed(1)).float()
    floor = frechet_distance(ref, gm.sample_x0(n, torch.Generator().manual_seed(2)).float())
    return ref, floor


def test_flow_euler_converges_to_the_exact_distribution():
    """Flow Euler with the exact velocity on a tight 2-d mixture (stds 0.007-0.095): the Frechet
    distance to exact samples falls as steps grow and at 50 steps is below 5x the distance between
    two exact sample sets (measured: 5 steps 0.019, 10 steps 0.0015, 50 steps 7.2e-5, floor 1.7e-4),
    i.e. more than 20x under the 5-step value. The epsilon and x0 readings of the same mixture give
    the same trajectory (Euler on u is DDIM at eta = 0 on the path: x_t + (s - t) u =
    (1 - s) x0_hat + s eps_hat), up to float32 rounding; the epsilon reading on sigmas below 1,
    since x0_hat = (x_t - sigma eps_hat) / (1 - sigma) is 0/0 at sigma = 1."""
    gm = GaussianMixture.random(2, 4, seed=1)
    n = 4000
    ref, floor = _exact_and_ref(gm, n)
    fs = FlowSchedule()
    fd = {}
    for k in (5, 10, 50):
        x = fastdiff.sample(gm.flow_model(fs), (n, 2), sampler="flow-euler", schedule=fs, steps=k, seed=0)
        fd[k] = frechet_distance(ref, x)
    assert fd[5] > fd[10] > fd[50], fd
    assert fd[50] < 5 * floor and fd[50] < fd[5] / 20, (fd, floor)
    for pred, sig in (("sample", None), ("epsilon", _sigmas_below_one(10))):
        kw = dict(steps=10) if sig is None else dict(steps=None, sigmas=sig)
        xp = fastdiff.sample(gm.flow_model(fs, pred), (n, 2), sampler="flow-euler", schedule=fs, seed=0,
                             prediction_type=pred, **kw)
        xu = fastdiff.sample(gm.flow_model(fs), (n, 2), sampler="flow-euler", schedule=fs, seed=0, **kw)
        assert bool(torch.isfinite(xu).all())
        torch.testing.assert_close(xp, xu, rtol=1e-4, atol=1e-5)


def _sigmas_below_one(k):
    # The default flow sigmas are linspace(1, 1/N, k); ocm-flow cannot start at sigma = 1 with the
    # exact head (test_ocm_flow_exact_head_at_sigma_one), so these start at 0.99.
    return list(np.linspace(0.99, 1.0 / N_TRAIN, k))


def test_ocm_flow_exact_head_runs_beats_euler_and_is_split_invariant():
    """ocm-flow with the exact head: finite, stochastic (the seed matters), the same samples when
    the batch is drawn in two pieces with sample_offset, and a Frechet distance under flow Euler's
    by more than 5x the exact-vs-exact floor (1.7e-4) at 5 and 10 steps (measured: 3.8e-4 vs 0.018
    at 5 steps, 1.1e-4 vs 1.3e-3 at 10, on sigmas from 0.99)."""
    gm = GaussianMixture.random(2, 4, seed=1)
    fs = FlowSchedule()
    n = 4000
    ref, floor = _exact_and_ref(gm, n)
    for k in (5, 10):
        sig = _sigmas_below_one(k)
        ocm = fastdiff.make_sampler("ocm-flow", fs, None, sigmas=sig, head=gm.flow_head(fs))
        x = ocm.sample(gm.flow_model(fs), (n, 2), seed=0)
        assert bool(torch.isfinite(x).all())
        euler = fastdiff.make_sampler("flow-euler", fs, None, sigmas=sig).sample(gm.flow_model(fs), (n, 2), seed=0)
        fd_ocm, fd_euler = frechet_distance(ref, x), frechet_distance(ref, euler)
        assert fd_ocm + 5 * floor < fd_euler, (k, fd_ocm, fd_euler, floor)
    ocm = fastdiff.make_sampler("ocm-flow", fs, None, sigmas=_sigmas_below_one(10), head=gm.flow_head(fs))
    whole = ocm.sample(gm.flow_model(fs), (96, 2), seed=3)
    parts = torch.cat([ocm.sample(gm.flow_model(fs), (40, 2), seed=3),
                       ocm.sample(gm.flow_model(fs), (56, 2), seed=3, sample_offset=40)])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    other = ocm.sample(gm.flow_model(fs), (96, 2), seed=4)
    assert float((other - whole).abs().mean()) > 1e-2  # the covariance noise is on
    # The combined-model convention (head=None, model returns (u, h)) gives the same samples.
    ocm_combined = fastdiff.make_sampler("ocm-flow", fs, None, sigmas=_sigmas_below_one(10))
    torch.testing.assert_close(ocm_combined.sample(gm.flow_model(fs, return_h=True), (96, 2), seed=3), whole,
                               rtol=0, atol=0)


def test_ocm_flow_exact_head_at_sigma_one():
    """On the default sigmas (the first is 1, as in diffusers) ocm-flow with the exact head gives
    finite samples: at sigma = 1 (a_t = 0) the table's cov_scale is a huge finite number, so the
    exact h = -1 gives Sigma0 = 0 there instead of inf * 0 = NaN (csrc/tables.cpp)."""
    gm = GaussianMixture.random(2, 4, seed=1)
    x = fastdiff.make_sampler("ocm-flow", FlowSchedule(), 5, head=gm.flow_head()).sample(gm.flow_model(), (64, 2))
    assert bool(torch.isfinite(x).all())


def test_flow_objective_is_unbiased_for_h():
    """ocm_target on the flow path (FlowSchedule, velocity model, t = sigma * N in float32): the mean
    of 64 single-probe targets lies within 5 standard errors of the exact h at every element, a
    256-probe target is close in RMS, and epsilon / x0 readings of the same mixture give the same
    target (it depends on the score only)."""
    gm = GaussianMixture.random(5, 4, std_range=(0.05, 0.3), seed=8)
    fs = FlowSchedule()
    g = torch.Generator().manual_seed(1)
    t = (torch.tensor([0.03, 0.2, 0.4, 0.6, 0.8, 0.97] * 4, dtype=torch.float64) * N_TRAIN).float()
    sigma = t.double() / N_TRAIN
    _, xt, _ = gm.sample_flow_xt(len(t), sigma, g)
    exact = gm.h(xt, sigma=sigma)
    model = gm.flow_model(fs)
    singles = torch.stack([ocm_target(model, xt, t, fs, generator=g) for _ in range(64)])
    mean, se = singles.mean(0), singles.std(0) / 8
    assert bool(((mean - exact).abs() <= 5 * se + 1e-6).all())
    # Not vacuous: a target off by 10% of |h| would fail the 5-SE bound here.
    assert float((5 * se + 1e-6 < 0.1 * exact.abs()).double().mean()) > 0.5
    est = ocm_target(model, xt, t, fs, probes=256, generator=g)
    rms = float(((est - exact) ** 2).mean().sqrt())
    assert rms < 1.5 * float((singles.var(0).mean() / 256).sqrt()) + 1e-6
    assert rms < 0.05 * float(exact.abs().mean())
    want = ocm_target(model, xt, t, fs, probes=3, generator=torch.Generator().manual_seed(5))
    for pred in ("epsilon", "sample"):
        got = ocm_target(gm.flow_model(fs, pred), xt, t, fs, prediction_type=pred, probes=3,
                         generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    # A velocity model read on the VP path would give a wrong score: refused, naming the path.
    with pytest.raises(ValueError, match="does not fit the VP path"):
        ocm_target(model, xt, t, Schedule(), prediction_type="flow_prediction")


class _Spy(torch.nn.Module):
    """Records the timesteps a model or head is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x, t):
        self.seen.append(t.detach().clone())
        return self.inner(x, t)


def test_train_head_on_the_flow_path():
    """train_head with a FlowSchedule: model and head get float32 t = sigma * N with sigma in (0, 1]
    spread over the whole range; a small MLPHead trained 500 steps lands at a relative MSE against
    the exact h below 0.3 (the constant h = -1 scores ~1); the error messages name the path."""
    torch.manual_seed(0)
    gm = GaussianMixture.random(2, 3, seed=3)
    fs = FlowSchedule()
    spy_model = _Spy(gm.flow_model(fs))
    head = MLPHead(2, fs, hidden=64)
    spy_head = _Spy(head)
    hist = train_head(spy_head, spy_model, gm.sample_x0, fs, steps=500, batch_size=256, lr=3e-3, log_every=250)
    assert len(hist) == 2 and hist[-1][1] < hist[0][1]
    for seen in (spy_model.seen, spy_head.seen):
        t = torch.cat(seen)
        assert t.dtype == torch.float32 and float(t.min()) > 0 and float(t.max()) <= N_TRAIN
        # uniform over (0, N]: quartiles of 128k draws within 1% of N of 250 / 500 / 750
        q = torch.quantile(t[:100_000].double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        assert bool(((q - torch.tensor([250.0, 500.0, 750.0], dtype=torch.float64)).abs() < 10).all()), q
    g = torch.Generator().manual_seed(9)
    t = (torch.rand(4000, generator=g, dtype=torch.float64) * N_TRAIN).float().clamp_min(1.0)
    _, xt, _ = gm.sample_flow_xt(4000, t.double() / N_TRAIN, g)
    with torch.no_grad():
        pred = head(xt.float(), t).double()
    exact = gm.h(xt, sigma=t.double() / N_TRAIN)
    rel = float(((pred - exact) ** 2).mean() / exact.var())
    assert rel < 0.3, rel
    const = float(((-1 - exact) ** 2).mean() / exact.var())
    assert const > 0.6, const  # the bound separates a head that learnt nothing
    with pytest.raises(ValueError, match="sigma_range must satisfy"):
        train_head(MLPHead(2, fs), gm.flow_model(fs), gm.sample_x0, fs, sigma_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="with a FlowSchedule give sigma_range"):
        train_head(MLPHead(2, fs), gm.flow_model(fs), gm.sample_x0, fs, t_range=(0, 10))
    with pytest.raises(ValueError, match="does not fit the flow path"):
        train_head(MLPHead(2, fs), gm.flow_model(fs), gm.sample_x0, fs, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="sigma_range applies to the flow path"):
        train_head(MLPHead(2), gm.model(), gm.sample_x0, sigma_range=(0.1, 0.9))


def test_probe_head_on_the_flow_path():
    """ProbeHead with a FlowSchedule (8 probes of the velocity model) in ocm-flow lands close to
    the exact head's samples; a head that ignores h (h = -1: no covariance term) lands farther."""
    gm = GaussianMixture.random(3, 3, seed=3)
    fs = FlowSchedule()
    sig = _sigmas_below_one(10)
    run = lambda head: fastdiff.make_sampler("ocm-flow", fs, None, sigmas=sig, head=head).sample(  # noqa: E731
        gm.flow_model(fs), (64, 3), seed=2)
    x_exact = run(gm.flow_head(fs))
    x_probe = run(ProbeHead(gm.flow_model(fs), fs, probes=8))
    with torch.inference_mode():
        torch.testing.assert_close(run(ProbeHead(gm.flow_model(fs), fs, probes=8)), x_probe)
    x_none = run(lambda x, t: torch.full_like(x, -1.0))
    d_probe = float((x_exact - x_probe).abs().mean())
    d_none = float((x_exact - x_none).abs().mean())
    assert d_probe < 0.4 * d_none, (d_probe, d_none)

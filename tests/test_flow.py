"""The rectified-flow family: C++ flow tables against float64 formulas written here, the native
flow samplers (Euler, stochastic, DDIM(eta), OCM) against float64 loops, split-invariant noise,
graphs, and a real flow loop with a tiny diffusers SD3 transformer (random weights, no hub)."""
import math
import warnings

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import _C
from fastdiff.engine.schedule import FlowSchedule

COL = {name: i for i, name in enumerate(fastdiff.COLUMNS)}


def sigmas_for(k, shift=3.0):
    return FlowSchedule(shift=shift).sigmas(k)


@pytest.mark.parametrize("kind,eta", [("euler", 0.0), ("stochastic", 0.0), ("ddim", 0.0), ("ddim", 0.7),
                                      ("ddim", 1.0)])
@pytest.mark.parametrize("ocm", [False, True])
def test_flow_table_rows_vs_float64(kind, eta, ocm):
    sig, ts = sigmas_for(7)
    tab = _C.flow_table(sig, ts, kind, eta, ocm=ocm)
    assert tab.shape == (7, len(fastdiff.COLUMNS))
    for i in range(7):
        st, ss = float(sig[i]), float(sig[i + 1])
        r = {k: tab[i, j] for k, j in COL.items()}
        assert r["a_t"] == 1 - st and r["b_t"] == st and r["a_s"] == 1 - ss and r["b_s"] == ss
        assert r["t"] == ts[i] and r["prev_t"] == (ts[i + 1] if i < 6 else -1)
        if kind == "euler":
            want = dict(c_xt=1.0, c_m=ss - st, c_x0=0.0, c_eps=0.0, std=0.0)
        elif kind == "stochastic":
            want = dict(c_xt=0.0, c_m=0.0, c_x0=1 - ss, c_eps=0.0, std=ss)
        else:
            # q(x_s | x_t, x0) on x = a x0 + b eps: Var = b_s^2 (b_t^2 - (a_t/a_s)^2 b_s^2) / b_t^2
            var = ss ** 2 * (st ** 2 - ((1 - st) / (1 - ss)) ** 2 * ss ** 2) / st ** 2
            lam = eta * math.sqrt(max(var, 0.0))
            want = dict(c_xt=0.0, c_m=0.0, c_x0=1 - ss, c_eps=math.sqrt(max(ss ** 2 - lam ** 2, 0.0)), std=lam)
        for k, v in want.items():
            assert r[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (k, i)
        # d x_s / d x0_hat at fixed x_t, by a finite difference through the update itself
        x, h = 0.3, 1e-6

        def update(x0):
            eps = (x - (1 - st) * x0) / st
            u = eps - x0
            return r["c_x0"] * x0 + r["c_eps"] * eps + r["c_xt"] * x + r["c_m"] * u

        assert r["c_cov"] == pytest.approx((update(0.2 + h) - update(0.2 - h)) / (2 * h), rel=1e-6, abs=1e-9)
        if st < 1:
            assert r["cov_scale"] == pytest.approx(st ** 2 / (1 - st) ** 2, rel=1e-12)
        assert r["noise"] == (1.0 if i < 6 else 0.0)


@pytest.mark.parametrize("call,match", [
    (lambda: _C.flow_table(np.array([1.0]), np.array([]), "euler"), "at least 2"),
    (lambda: _C.flow_table(np.array([1.0, 0.5, 0.0]), np.array([1000.0]), "euler"), "one value fewer"),
    (lambda: _C.flow_table(np.array([1.2, 0.0]), np.array([1000.0]), "euler"), r"lie in \[0, 1\]"),
    (lambda: _C.flow_table(np.array([0.2, 0.8]), np.array([200.0]), "ddim"), "strictly descending"),
    (lambda: _C.flow_table(np.array([0.8, 0.2]), np.array([800.0]), "heun"), "unknown flow step kind"),
    (lambda: _C.flow_table(np.array([0.8, 0.2]), np.array([800.0]), "ddim", -1.0), "eta must be"),
    (lambda: _C.flow_table(np.array([0.8, 0.2]), np.array([np.nan]), "euler"), "finite"),
    (lambda: fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-euler", prediction_type="v_prediction"),
     "flow path must be one of"),
    (lambda: fastdiff.sample(lambda x, t: x, (1, 2), sampler="ddim", prediction_type="flow_prediction"),
     "flow sampler"),
    (lambda: fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-euler", mu=0.5), "use_dynamic_shifting=True only"),
    (lambda: fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-euler", schedule=dict(use_dynamic_shifting=True)),
     "needs mu or image_seq_len"),
    (lambda: fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-euler", steps=3, sigmas=[0.9, 0.5]),
     "not both"),
    (lambda: fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-euler", eta=0.5), "flow-ddim"),
    (lambda: FlowSchedule(shift=-1.0), "shift"),
])
def test_flow_errors_name_the_constraint(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def velocity_model(x, t):
    assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
    return torch.tanh(0.7 * x) * (0.4 + t[:, None] / 2000.0)


def f64_flow_loop(x, sig, ts, kind, zs=None):
    x = x.double()
    for i in range(len(ts)):
        st, ss = float(sig[i]), float(sig[i + 1])
        u = velocity_model(x.float(), torch.full((x.shape[0],), float(np.float32(ts[i])))).double()
        if kind == "euler":
            x = x + (ss - st) * u
        else:
            x0 = x - st * u
            x = (1 - ss) * x0 + ss * zs[i].double()
    return x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flow_euler_loop_vs_float64(backend):
    s = fastdiff.FlowEulerSampler(dict(shift=3.0), 9, backend=backend)
    x_T = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    got = s.sample(velocity_model, x=x_T)
    want = f64_flow_loop(x_T, s.sigmas, s.timesteps, "euler")
    assert float((got.double() - want).abs().max()) < 1e-5
    # diffusers' timesteps: the float32 sigma times N in float32
    np.testing.assert_array_equal(s.timesteps, (s.sigmas[:-1].astype(np.float32) * np.float32(1000)).astype(np.float64))


def test_flow_euler_reads_sample_and_epsilon_models_too():
    sigmas = np.linspace(0.95, 0.1, 6)  # an epsilon model cannot give x0 at sigma = 1 (a = 0)
    x_T = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    a = fastdiff.FlowEulerSampler(None, None, sigmas=sigmas).sample(velocity_model, x=x_T)
    sig = lambda t: (t / 1000.0)[:, None]  # noqa: E731
    as_x0 = lambda x, t: x - sig(t) * velocity_model(x, t)  # noqa: E731  x0 = x - sigma u
    as_eps = lambda x, t: x + (1 - sig(t)) * velocity_model(x, t)  # noqa: E731
    b = fastdiff.FlowEulerSampler(None, None, sigmas=sigmas, prediction_type="sample").sample(as_x0, x=x_T)
    c = fastdiff.FlowEulerSampler(None, None, sigmas=sigmas, prediction_type="epsilon").sample(as_eps, x=x_T)
    assert float((a - b).abs().max()) < 1e-5 and float((a - c).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="sigma = 1"):
        fastdiff.FlowEulerSampler(None, 6, prediction_type="epsilon")


@pytest.mark.parametrize("name,kw", [("flow-stochastic", {}), ("flow-ddim", dict(eta=0.8)),
                                      ("ocm-flow", dict(head=lambda x, t: -0.5 * torch.tanh(x)))])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_noised_flow_samplers_split_invariant(name, kw, backend):
    opts = dict(sampler=name, steps=5, seed=9, backend=backend, **kw)
    full = fastdiff.sample(velocity_model, (4, 6), **opts)
    parts = torch.cat([fastdiff.sample(velocity_model, (2, 6), sample_offset=o, **opts) for o in (0, 2)])
    assert torch.equal(full, parts) and torch.isfinite(full).all()


def test_flow_stochastic_vs_float64_with_the_kernels_noise():
    s = fastdiff.FlowStochasticSampler(dict(shift=2.0), 4)
    x_T = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    seed = torch.tensor([5])
    from fastdiff.engine.kernels import philox
    zs = [philox.normals_range(seed.reshape(()), 0, x_T.numel(), i, philox.STREAM_STEP, "cpu").view(x_T.shape)
          for i in range(4)]
    got = s.loop(velocity_model, x_T.clone(), seed)
    want = f64_flow_loop(x_T, s.sigmas, s.timesteps, "stochastic", zs)
    assert float((got.double() - want).abs().max()) < 1e-5


def test_ocm_flow_widens_the_euler_mean():
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    mean = fastdiff.FlowEulerSampler(None, 8).sample(velocity_model, x=x_T)
    same = fastdiff.sample(velocity_model, x=x_T, sampler="ocm-flow", steps=8, head=lambda x, t: torch.full_like(x, -1.0))
    wide = fastdiff.sample(velocity_model, x=x_T, sampler="ocm-flow", steps=8, head=lambda x, t: torch.zeros_like(x))
    # h = -1 means Sigma0 = 0: no noise, the Euler mean (in x0 / eps form: equal to rounding)
    assert float((same - mean).abs().max()) < 1e-5
    assert float((wide - mean).std()) > 0.01


def test_cuda_graph_flag_on_cpu_runs_eagerly_with_the_same_samples(monkeypatch):
    from fastdiff import graphs
    monkeypatch.setattr(graphs, "_DEFAULT", graphs.GraphCache())
    kw = dict(sampler="flow-stochastic", steps=4, seed=3)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        a = fastdiff.sample(velocity_model, (2, 3), cuda_graph=True, **kw)
    assert torch.equal(a, fastdiff.sample(velocity_model, (2, 3), **kw))


def test_dynamic_shifting_by_image_seq_len_is_the_pipelines_mu():
    sched = FlowSchedule(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)  # calculate_shift, linear in the token count
    assert sched.mu(1024) == pytest.approx(mu, rel=1e-12)
    a = fastdiff.FlowEulerSampler(sched, 6, image_seq_len=1024)
    b = fastdiff.FlowEulerSampler(sched, 6, mu=mu)
    np.testing.assert_allclose(a.sigmas, b.sigmas, rtol=1e-12)


@pytest.mark.parametrize("stochastic", [False, True])
def test_tiny_sd3_transformer_loop_matches_diffusers(stochastic):
    """A real flow loop as diffusers' SD3 pipeline drives it: random-weight SD3Transformer2DModel,
    timestep = scheduler timestep expanded over the batch, diffusers' scheduler vs the drop-in,
    and the native flow-euler sampler on the same model and sigmas. With stochastic_sampling the
    step draws diffusers' noise from the generator it is given (the same one for both loops); the
    native flow-stochastic sampler draws Philox noise instead, so it is compared only without."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import FlowMatchEulerDiscreteScheduler as Fast
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4).eval()
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 16, generator=gen)
    pooled = torch.randn(2, 8, generator=gen)
    x_T = torch.randn(2, 4, 8, 8, generator=gen)

    def net(x, t):
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample

    results = []
    with torch.no_grad():
        for cls in (diffusers.FlowMatchEulerDiscreteScheduler, Fast):
            sched = cls(shift=3.0, stochastic_sampling=stochastic)
            sched.set_timesteps(6)
            x = x_T.clone()
            step_gen = torch.Generator().manual_seed(2)
            for t in sched.timesteps:
                x = sched.step(net(x, t.expand(x.shape[0])), t, x, generator=step_gen).prev_sample
            results.append(x)
        native = fastdiff.FlowEulerSampler(dict(shift=3.0), 6).sample(net, x=x_T)
    ref, fast = results
    assert float((ref - fast).abs().max()) <= 1e-4
    if not stochastic:
        assert float((ref - native).abs().max()) <= 1e-4
    else:  # the noise is on: the stochastic loop leaves the Euler path
        assert float((ref - native).abs().max()) > 1e-2

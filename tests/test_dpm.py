"""DPM-Solver++ (orders 1-2, midpoint / heun, ODE and SDE) as fused rows with a history slot:
the drop-in against diffusers' DPMSolverMultistepScheduler over its config space and random
configs, the native samplers against the drop-in and a float64 recursion written here, the
Triton kernel, img2img starts, split-invariant SDE noise, no host sync.

Bound: every step within 4e-6 of the scale max(1, max|x|) of diffusers' output (the table's
coefficients are rounded once from float64, diffusers' after every float32 operation; measured
worst case here ~1e-6)."""
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler as Ref  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.diffusers import DPMSolverMultistepScheduler as Fast  # noqa: E402

TOL = 4e-6


def model(x, t):
    return torch.tanh(0.6 * x.float()) * (0.3 + float(t) / 2000.0)


def loops(cfg, steps, *, dtype=torch.float32, backend=None, begin=None, shape=(2, 3, 5, 4), seed=0):
    r, f = Ref(**cfg), Fast(**cfg)
    if backend:
        f.backend = backend
    r.set_timesteps(steps)
    f.set_timesteps(steps)
    if begin is not None:
        r.set_begin_index(begin)
        f.set_begin_index(begin)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    xr, xf = x.clone(), x.clone()
    gr, gf = torch.Generator().manual_seed(seed + 7), torch.Generator().manual_seed(seed + 7)
    worst = 0.0
    for t in r.timesteps[begin or 0:]:
        xr = r.step(model(xr, t).to(dtype), t, xr, generator=gr).prev_sample
        xf = f.step(model(xf, t).to(dtype), t, xf, generator=gf).prev_sample
        assert xf.dtype == xr.dtype
        worst = max(worst, float((xr.double() - xf.double()).abs().max() / xr.double().abs().max().clamp_min(1)))
    assert f.step_index == r.step_index and f.lower_order_nums == r.lower_order_nums
    return worst


CONFIGS = [
    {}, dict(use_karras_sigmas=True), dict(algorithm_type="sde-dpmsolver++"), dict(solver_type="heun"),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(solver_order=1), dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
    dict(final_sigmas_type="sigma_min", euler_at_final=True), dict(thresholding=True, prediction_type="sample"),
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True),
    dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True), dict(use_lu_lambdas=True),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1, lower_order_final=False),
    dict(beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("steps", [6, 20])
def test_config_space_matches_diffusers(cfg, steps):
    assert loops(cfg, steps) < TOL


@pytest.mark.parametrize("draw", range(30))
def test_random_configs(draw):
    rnd = random.Random(500 + draw)
    cfg = dict(algorithm_type=rnd.choice(["dpmsolver++", "sde-dpmsolver++"]), solver_order=rnd.choice([1, 2, 2]),
               solver_type=rnd.choice(["midpoint", "heun"]), lower_order_final=rnd.random() < 0.8,
               euler_at_final=rnd.random() < 0.2, final_sigmas_type=rnd.choice(["zero", "sigma_min"]),
               timestep_spacing=rnd.choice(["linspace", "leading", "trailing"]),
               beta_schedule=rnd.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]))
    flow = rnd.random() < 0.2
    if flow:
        cfg.update(use_flow_sigmas=True, flow_shift=rnd.choice([1.0, 3.0, 5.0]), prediction_type="flow_prediction")
    else:
        cfg["prediction_type"] = rnd.choice(["epsilon", "v_prediction", "sample"])
        spacing = rnd.random()
        if spacing < 0.3:
            cfg["use_karras_sigmas"] = True
        elif spacing < 0.4:
            cfg["use_exponential_sigmas"] = True
        elif spacing < 0.5:
            cfg["use_lu_lambdas"] = True
    if cfg["prediction_type"] == "sample" and rnd.random() < 0.5:
        cfg["thresholding"] = True
    steps = rnd.choice([2, 5, 10, 16, 25])
    probe = Ref(**cfg)
    probe.set_timesteps(steps)
    if int((probe.timesteps == probe.timesteps[0]).sum()) > 1:
        # A repeated first timestep (Karras sigmas on a cosine schedule): diffusers starts at its
        # second occurrence and runs past its sigmas at the last step; fastdiff says so instead.
        f = Fast(**cfg)
        f.set_timesteps(steps)
        x = torch.zeros(1, 2)
        with pytest.raises(ValueError, match="more often than there are timesteps"):
            for t in f.timesteps:
                x = f.step(x, t, x).prev_sample
        return
    assert loops(cfg, steps, shape=(1, 2, 3, 3), seed=draw) < TOL, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # diffusers converts x0_hat and keeps its history in the model's dtype and computes the update
    # in float32; fastdiff keeps x0_hat in float32 too: one ulp of the dtype per step, not more.
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert loops(dict(use_karras_sigmas=True), 10, dtype=dtype) < 4 * ulp


def test_triton_kernel():
    for cfg in (dict(use_karras_sigmas=True), dict(algorithm_type="sde-dpmsolver++", solver_type="heun")):
        assert loops(cfg, 6, backend="triton", shape=(2, 3, 4)) < TOL


def test_img2img_start_steps_first_order_first():
    for cfg in ({}, dict(algorithm_type="sde-dpmsolver++")):
        assert loops(cfg, 12, begin=5) < TOL


def test_unserved_configs_run_diffusers_step():
    for cfg in (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), dict(solver_order=3),
                dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")):
        assert loops(cfg, 8) == 0.0  # diffusers' own arithmetic: bit for bit


def test_native_sampler_equals_the_drop_in_loop():
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for name, cfg in (("dpmpp-2m", dict(use_karras_sigmas=True)), ("dpmpp-2m", dict(solver_type="heun"))):
        native = fastdiff.sample(lambda x, t: model(x, t[0]), x=x_T, sampler=name, steps=9, **cfg)
        f = Fast(**cfg)
        f.set_timesteps(9)
        x = x_T.clone()
        for t in f.timesteps:
            x = f.step(model(x, t), t, x).prev_sample
        assert float((native - x).abs().max() / x.abs().max().clamp_min(1)) < TOL


def test_native_second_order_vs_float64_recursion():
    """DPM-Solver++(2M) midpoint written here from the paper's update, in float64."""
    s = fastdiff.DPMSolverSampler(None, 7, lower_order_final=False)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    got = s.sample(lambda x, t: model(x, t[0]), x=x_T)
    sig = s.sigmas
    alpha = lambda v: 1 / math.sqrt(v * v + 1)  # noqa: E731
    lam = lambda v: math.log(alpha(v)) - math.log(v * alpha(v)) if v > 0 else math.inf  # noqa: E731
    x, prev, h_prev = x_T.double(), None, None
    for i, t in enumerate(s.timesteps):
        a0, s0 = alpha(sig[i]), sig[i] * alpha(sig[i])
        a1, s1 = alpha(sig[i + 1]), sig[i + 1] * alpha(sig[i + 1])
        x0 = (x - s0 * model(x.float(), t).double()) / a0
        h = lam(sig[i + 1]) - lam(sig[i])
        em1 = -1.0 if math.isinf(h) else math.expm1(-h)
        if prev is None or math.isinf(h):  # the first step, and the step onto sigma = 0: first order
            d = x0
        else:
            d = x0 + 0.5 * (x0 - prev) * h / h_prev
        x = (s1 / s0) * x - a1 * em1 * d
        prev, h_prev = x0, h
    assert float((got.double() - x).abs().max() / x.abs().max()) < 2e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sde_noise_split_invariant(backend):
    opts = dict(sampler="dpmpp-2m-sde", steps=6, seed=3, backend=backend)
    f = lambda x, t: model(x, t[0])  # noqa: E731
    full = fastdiff.sample(f, (4, 5), **opts)
    parts = torch.cat([fastdiff.sample(f, (1, 5), sample_offset=o, **opts) for o in range(4)])
    assert torch.equal(full, parts) and torch.isfinite(full).all()


def test_flow_native_dpm_runs_and_errors():
    sig = np.linspace(0.995, 0.02, 8)
    x = fastdiff.sample(lambda x, t: torch.tanh(x), (2, 3), sampler="flow-dpmpp-2m", steps=None, sigmas=sig)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="below 1"):
        fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-dpmpp-2m", steps=5)
    with pytest.raises(ValueError, match="solver_order"):
        fastdiff.DPMSolverSampler(None, 5, solver_order=3)


def test_no_host_sync_per_step(request):
    f = Fast(algorithm_type="sde-dpmsolver++")
    f.set_timesteps(6)
    f.set_noise_seed(1)
    x = torch.randn(2, 3)
    ts = list(f.timesteps)
    reads = request.getfixturevalue("host_reads")
    for t in ts:
        x = f.step(x * 0.1, t, x).prev_sample
    assert reads.stop() == []


@pytest.mark.parametrize("name,cfg,native_cfg", [
    ("dpmpp-2m-sde", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
     dict(use_karras_sigmas=True, steps=8)),
    ("flow-dpmpp-2m-sde", dict(algorithm_type="sde-dpmsolver++", use_flow_sigmas=True, flow_shift=3.0,
                               prediction_type="flow_prediction"), None),
])
def test_native_sde_equals_the_drop_in_fed_the_same_noise(name, cfg, native_cfg):
    """The native SDE loop draws step i's noise in the kernel (Philox, seed, row i); the drop-in
    fed exactly those normals as variance_noise must give the same samples."""
    f = Fast(**cfg)
    f.set_timesteps(8)
    if native_cfg is None:  # the flow path: the drop-in's own sigmas, given as a list
        sig = f.sigmas.double().numpy()
        native_cfg = dict(sigmas=sig[:-1], steps=None)
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    s = fastdiff.samplers.make_sampler(name, **native_cfg)
    m = (lambda x, t: model(x, t[0])) if not s.flow else (lambda x, t: torch.tanh(x) * 0.4 + 0.1 * x)
    native = s.sample(m, x=x_T, seed=11)
    seed = torch.tensor([11])
    x = x_T.clone()
    for i, t in enumerate(f.timesteps):
        z = fastdiff.engine.kernels.philox.randn(x.shape, seed, step=i, stream=fastdiff.engine.kernels.philox.STREAM_STEP)
        x = f.step(m(x, t.reshape(1).expand(x.shape[0])), t, x, variance_noise=z).prev_sample
    # native sigmas are float64, the drop-in's diffusers' float32 ones (Karras: ~3e-6 of the scale)
    assert float((native - x).abs().max() / x.abs().max().clamp_min(1)) < 2e-5, name

"""Euler and Euler-ancestral (sigma space) drop-ins against diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler, the fused next model input, the Triton kernel, no host sync.

Bound: every step (and every scaled model input) within 4e-6 of the scale max(1, max|x_t|,
max|output|) of diffusers' (coefficients rounded once from float64 against diffusers' float32
chain; x_t is in the scale because diffusers' x_t + (x_t - x0_hat) / sigma * dt cancels to
x0_hat at the last step, with an error of an ulp of x_t, ~160 at sigma_max); 2e-5 with zero
terminal SNR, where sigma_max = 4096."""
import random

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.diffusers import EulerAncestralDiscreteScheduler as FastA  # noqa: E402
from fastdiff.diffusers import EulerDiscreteScheduler as FastE  # noqa: E402


def model(x, t):
    return torch.tanh(0.6 * x.float()) * (0.3 + float(t) / 2000.0)


def loops(ref_cls, fast_cls, cfg, steps=10, *, dtype=torch.float32, backend=None, shape=(2, 3, 4, 4), seed=0):
    r, f = ref_cls(**cfg), fast_cls(**cfg)
    if backend:
        f.backend = backend
    r.set_timesteps(steps)
    f.set_timesteps(steps)
    assert torch.equal(r.sigmas, f.sigmas) and float(r.init_noise_sigma) == float(f.init_noise_sigma)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * r.init_noise_sigma).to(dtype)
    xr, xf = x.clone(), x.clone()
    gr, gf = torch.Generator().manual_seed(seed + 3), torch.Generator().manual_seed(seed + 3)
    worst = 0.0
    for t in r.timesteps:
        ir, i_f = r.scale_model_input(xr, t), f.scale_model_input(xf, t)
        worst = max(worst, float((ir.double() - i_f.double()).abs().max() / ir.double().abs().max().clamp_min(1)))
        a = r.step(model(ir, t).to(dtype), t, xr, generator=gr)
        b = f.step(model(i_f, t).to(dtype), t, xf, generator=gf)
        scale = max(1.0, float(xr.double().abs().max()))
        for u, v in ((a.prev_sample, b.prev_sample), (a.pred_original_sample, b.pred_original_sample)):
            assert u.dtype == v.dtype and u.shape == v.shape
            worst = max(worst, float((u.double() - v.double()).abs().max()) / max(scale, float(u.abs().max())))
        xr, xf = a.prev_sample, b.prev_sample
    assert r.step_index == f.step_index
    return worst


EULER = [{}, dict(use_karras_sigmas=True), dict(prediction_type="v_prediction", timestep_spacing="trailing"),
         dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
              beta_end=0.012), dict(final_sigmas_type="sigma_min", use_karras_sigmas=True),
         dict(interpolation_type="log_linear"), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
         dict(prediction_type="sample")]
ANCESTRAL = [{}, dict(prediction_type="v_prediction"), dict(timestep_spacing="leading", steps_offset=1),
             dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)]


@pytest.mark.parametrize("cfg", EULER, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_euler_matches_diffusers(cfg):
    if cfg.get("prediction_type") == "sample":
        pytest.importorskip("diffusers")  # diffusers' Euler reads "sample" as x0 too
    assert loops(diffusers.EulerDiscreteScheduler, FastE, cfg) < 4e-6


@pytest.mark.parametrize("cfg", ANCESTRAL, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_euler_ancestral_matches_diffusers_noise_included(cfg):
    assert loops(diffusers.EulerAncestralDiscreteScheduler, FastA, cfg) < 4e-6


def test_zero_terminal_snr():
    cfg = dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert loops(diffusers.EulerAncestralDiscreteScheduler, FastA, cfg) < 2e-5
    assert loops(diffusers.EulerDiscreteScheduler, FastE, cfg) < 2e-5


@pytest.mark.parametrize("draw", range(16))
def test_random_configs(draw):
    rnd = random.Random(900 + draw)
    cfg = dict(prediction_type=rnd.choice(["epsilon", "v_prediction"]),
               timestep_spacing=rnd.choice(["linspace", "leading", "trailing"]),
               beta_schedule=rnd.choice(["linear", "scaled_linear"]))
    ancestral = rnd.random() < 0.4
    if not ancestral and rnd.random() < 0.4:
        cfg["use_karras_sigmas"] = True
    pair = (diffusers.EulerAncestralDiscreteScheduler, FastA) if ancestral else (diffusers.EulerDiscreteScheduler,
                                                                                FastE)
    assert loops(*pair, cfg, steps=rnd.choice([1, 3, 8, 25]), shape=(1, 2, 3, 3), seed=draw) < 4e-6, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert loops(diffusers.EulerDiscreteScheduler, FastE, {}, dtype=dtype) < 2 * ulp
    assert loops(diffusers.EulerAncestralDiscreteScheduler, FastA, {}, dtype=dtype) < 2 * ulp


def test_triton_kernel():
    assert loops(diffusers.EulerDiscreteScheduler, FastE, dict(use_karras_sigmas=True), backend="triton",
                 shape=(2, 3, 4)) < 4e-6
    assert loops(diffusers.EulerAncestralDiscreteScheduler, FastA, {}, backend="triton", shape=(2, 3, 4)) < 4e-6


def test_scale_model_input_hands_back_the_fused_input():
    f = FastE()
    f.set_timesteps(5)
    x = torch.randn(1, 2, 3) * f.init_noise_sigma
    first = f.scale_model_input(x, f.timesteps[0])  # not a step output: diffusers' division
    out = f.step(model(first, f.timesteps[0]), f.timesteps[0], x).prev_sample
    fused = f.scale_model_input(out, f.timesteps[1])
    assert fused is f._fd.next_input[1]
    torch.testing.assert_close(fused, out / (f.sigmas[1] ** 2 + 1) ** 0.5, rtol=2e-7, atol=0)
    other = f.scale_model_input(torch.cat([out, out]), f.timesteps[1])  # a CFG batch: its own pass
    torch.testing.assert_close(other[:1], fused, rtol=2e-7, atol=0)


def test_s_churn_runs_diffusers_step():
    r, f = diffusers.EulerDiscreteScheduler(), FastE()
    for s in (r, f):
        s.set_timesteps(6)
    x = torch.randn(1, 2, 3)
    a = r.step(x * 0.1, r.timesteps[0], x, s_churn=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    b = f.step(x * 0.1, f.timesteps[0], x, s_churn=0.5, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(a, b)


def test_errors_and_no_host_sync(request):
    f = FastA()
    f.set_timesteps(4)
    f.set_noise_seed(2)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="integer indices"):
        f.step(x, 3, x)
    ts = list(f.timesteps)
    reads = request.getfixturevalue("host_reads")
    for t in ts:
        x = f.step(x * 0.1, t, f.scale_model_input(x, t)).prev_sample
    assert reads.stop() == []
    with pytest.raises(ValueError, match="more often than there are timesteps"):
        f.step(x, ts[-1], x)


def test_native_euler_matches_the_diffusers_loop_one_pass_per_step():
    import fastdiff

    calls = []

    def net(x, t):
        calls.append(x)
        return torch.tanh(0.6 * x.float()) * (0.3 + t[:, None, None, None] / 2000.0)

    s = fastdiff.EulerSampler(None, 10, use_karras_sigmas=True)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    got = s.sample(net, x=x_T * s.init_noise_sigma)
    r = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    r.set_timesteps(10)
    assert abs(float(r.init_noise_sigma) - s.init_noise_sigma) < 1e-4 * s.init_noise_sigma
    x = x_T * r.init_noise_sigma
    for t in r.timesteps:
        x = r.step(net(r.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
    assert float((x - got).abs().max()) < 4e-6 * float(x_T.abs().max() * s.init_noise_sigma)
    # the model saw the fused scaled input: every call after the first is on the step's own buffer
    assert len({c.data_ptr() for c in calls[:10]}) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_native_euler_ancestral_split_invariant(backend):
    import fastdiff
    f = lambda x, t: torch.tanh(x) * 0.5  # noqa: E731
    opts = dict(sampler="euler-a", steps=6, seed=4, backend=backend)
    full = fastdiff.sample(f, (4, 5), **opts)
    parts = torch.cat([fastdiff.sample(f, (2, 5), sample_offset=o, **opts) for o in (0, 2)])
    assert torch.equal(full, parts) and torch.isfinite(full).all()

"""fastdiff.diffusers.DDIMScheduler / DDPMScheduler against the installed diffusers.

Every step is checked three ways on the same inputs: fastdiff's output, diffusers' output, and an
independent float64 computation of the update written here (``oracle``), which uses diffusers'
float32 alphas_cumprod widened to float64 (the values both schedulers step with).

Tolerances, as a fraction of s = max(1, max |oracle|) (x0_hat reaches 1/sqrt(alpha_bar) ~ 160
times the inputs at high t, so errors are measured against the tensor's scale):
  * float32: 4e-6 (~32 float32 ulps at the scale). The table holds each coefficient rounded once
    to float32 from float64 where diffusers rounds after every float32 operation; both sit a few
    ulps from the exact value, and the x0 division amplifies input rounding by 1/sqrt(alpha_bar).
  * float16 / bfloat16: 0.5 ulp of the dtype (one rounding of a float32 result) + 4e-6. diffusers
    computes these in the low precision itself, so it is only required to be within its own
    distance from the oracle plus this tolerance. The Triton interpreter truncates float32 ->
    bfloat16 instead of rounding: 1 ulp there.
"""
import inspect
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff.diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

EPS = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 0.0}
FP32_TOL = 4e-6


def tolerance(dtype, backend="torch"):
    if dtype == torch.float64:
        return 1e-12
    half_ulp = (1.0 if backend == "triton" and dtype == torch.bfloat16 else 0.5) * EPS[dtype]
    return half_ulp + FP32_TOL


# ------------------------------------------------------------------------------------------
# the independent float64 update


def oracle(kind, cfg, ab32, t, prev, x, m, z, *, eta=0.0, use_clipped=False, pv=None):
    """One DDIM / DDPM step in float64 from the papers' equations (Song et al. eq. 12; Ho et al.
    eq. 6-7) with diffusers' conventions (final alpha, thresholding, variance types)."""
    ab = ab32.double()
    x, m = x.double(), m.double()
    a_t = ab[t]
    if prev >= 0:
        a_s = ab[prev]
    elif kind == "ddim" and not cfg["set_alpha_to_one"]:
        a_s = ab[0]
    else:
        a_s = torch.tensor(1.0, dtype=torch.float64)
    pred = cfg["prediction_type"]
    if pred == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * m) / a_t.sqrt(), m
    elif pred == "v_prediction":
        x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * m, a_t.sqrt() * m + (1 - a_t).sqrt() * x
    else:
        x0, eps = m, (x - a_t.sqrt() * m) / (1 - a_t).sqrt()
    if cfg["thresholding"]:
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), cfg["dynamic_thresholding_ratio"], dim=1)
        s = s.clamp(1.0, cfg["sample_max_value"]).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    elif cfg["clip_sample"]:
        r = cfg["clip_sample_range"]
        x0 = x0.clamp(-r, r)
    if kind == "ddim":
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        std = eta * var.sqrt()
        if use_clipped:
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        # Exactly 0 at eta = 1 when alpha_bar_t = 0 (zero terminal SNR); float64 may round it below.
        out = a_s.sqrt() * x0 + (1 - a_s - std ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            out = out + std * z.double()
        return out, x0
    beta_ts = 1 - a_t / a_s
    out = a_s.sqrt() * beta_ts / (1 - a_t) * x0 + (a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t) * x
    if t > 0:
        small = ((1 - a_s) / (1 - a_t) * beta_ts).clamp(min=1e-20)
        vt = cfg["variance_type"]
        if vt in ("fixed_small", "fixed_small_log"):
            var = small
        elif vt in ("fixed_large", "fixed_large_log"):
            var = beta_ts
        elif vt == "learned":
            var = pv.double()
        else:
            frac = (pv.double() + 1) / 2
            var = torch.exp(frac * beta_ts.log() + (1 - frac) * small.log())
        out = out + var.sqrt() * z.double()
    return out, x0


# ------------------------------------------------------------------------------------------
# the differential loop


def make_pair(kind, cfg):
    ref_cls, fast_cls = ((diffusers.DDIMScheduler, DDIMScheduler) if kind == "ddim"
                         else (diffusers.DDPMScheduler, DDPMScheduler))
    ref = ref_cls(**cfg)
    return ref, fast_cls.from_config(ref.config)


def full_config(kind, **kw):
    cfg = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, clip_sample=False, clip_sample_range=1.0, prediction_type="epsilon",
               thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
               timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
    if kind == "ddim":
        cfg["set_alpha_to_one"] = True
    else:
        cfg["variance_type"] = "fixed_small"
    cfg.update(kw)
    return cfg


def err(a, b, scale):
    return (a.double() - b.double()).abs().max().item() / scale


def run_loop(kind, cfg, *, steps=6, dtype=torch.float32, eta=0.0, use_clipped=False, shape=(2, 3, 5, 7),
             backend="torch", seed=0, custom=None, max_steps=None):
    """Steps diffusers' trajectory; at every step fastdiff and the oracle get the same inputs."""
    ref, fast = make_pair(kind, cfg)
    fast.backend = backend
    if custom is not None:
        ref.set_timesteps(timesteps=custom)
        fast.set_timesteps(timesteps=custom)
    else:
        ref.set_timesteps(steps)
        fast.set_timesteps(steps)
    assert torch.equal(ref.timesteps, fast.timesteps), (cfg, ref.timesteps, fast.timesteps)
    learned = kind == "ddpm" and cfg["variance_type"] in ("learned", "learned_range")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    g_ref = torch.Generator().manual_seed(seed + 1)
    g_fast = torch.Generator().manual_seed(seed + 1)
    tol = tolerance(dtype, backend)
    n = cfg["num_train_timesteps"]
    ts = ref.timesteps.tolist()
    for i, t in enumerate(ts[:max_steps]):
        m = torch.randn(shape, generator=gen)
        if learned:
            pv = torch.rand(shape, generator=gen) * 2 - 1 if cfg["variance_type"] == "learned_range" \
                else torch.rand(shape, generator=gen) * 0.02 + 1e-4
            m = torch.cat([m, pv], dim=1)
        m = m.to(dtype)
        # The noise diffusers is about to draw: a copy of its generator, the same randn_tensor call.
        draws = (eta > 0) if kind == "ddim" else t > 0
        z = None
        if draws:
            g_copy = torch.Generator().set_state(g_ref.get_state())
            z = randn_tensor(shape, generator=g_copy, dtype=dtype)
        kw = dict(eta=eta, use_clipped_model_output=use_clipped) if kind == "ddim" else {}
        t_in = torch.tensor(t) if i % 2 else t  # pipelines pass 0-dim tensors, users ints
        r = ref.step(m, t_in, x, generator=g_ref, **kw)
        f = fast.step(m, t_in, x, generator=g_fast, **kw)
        prev = (t - n // ref.num_inference_steps) if kind == "ddim" else (ts[i + 1] if i + 1 < len(ts) else -1)
        mo, pv = (m[:, :shape[1]], m[:, shape[1]:]) if learned else (m, None)
        o, o_x0 = oracle(kind, cfg, ref.alphas_cumprod, t, prev, x, mo, z, eta=eta, use_clipped=use_clipped, pv=pv)
        where = f"{kind} {cfg} dtype={dtype} eta={eta} clipped={use_clipped} step {i} t={t}"
        assert f.prev_sample.dtype == r.prev_sample.dtype == dtype, where
        assert f.prev_sample.shape == r.prev_sample.shape, where
        for name, fv, rv, ov in (("prev_sample", f.prev_sample, r.prev_sample, o),
                                 ("pred_original_sample", f.pred_original_sample, r.pred_original_sample, o_x0)):
            scale = max(1.0, ov.abs().max().item())
            e_fast, e_ref = err(fv, ov, scale), err(rv, ov, scale)
            assert torch.isfinite(fv).all(), f"{name} not finite: {where}"
            assert e_fast <= tol, f"{name}: fastdiff vs float64 {e_fast:.3g} > {tol:.3g}: {where}"
            if dtype == torch.float32:  # the oracle is right: diffusers itself agrees with it.
                # Its bound is wider: it computes beta_ts = 1 - ab_t/ab_s in float32, which cancels
                # at small t (beta ~ 1e-4 keeps ~10 good bits; 3.4e-5 measured at t = 3), where
                # the table computes it in float64 from the same float32 alpha_bar values.
                assert e_ref <= 2e-4, f"{name}: diffusers vs float64 {e_ref:.3g}: {where}"
        x = r.prev_sample
    # Both drew the same noise the same number of times.
    assert torch.equal(g_ref.get_state(), g_fast.get_state())


# ------------------------------------------------------------------------------------------
# fixed sweeps (torch path)

PREDS = ("epsilon", "v_prediction", "sample")
X0_MODES = (dict(), dict(clip_sample=True, clip_sample_range=1.5),
            dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pred", PREDS)
def test_ddim_sweep(pred, dtype):
    for x0_mode in X0_MODES:
        for spacing in ("leading", "trailing", "linspace"):
            for set_alpha_to_one in (True, False):
                for eta in (0.0, 0.5, 1.0):
                    cfg = full_config("ddim", prediction_type=pred, timestep_spacing=spacing,
                                      set_alpha_to_one=set_alpha_to_one, **x0_mode)
                    run_loop("ddim", cfg, steps=4, dtype=dtype, eta=eta, use_clipped=eta == 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned",
                                           "learned_range"])
def test_ddpm_sweep(variance_type, dtype):
    for pred in PREDS:
        for x0_mode in X0_MODES:
            for spacing in ("leading", "trailing", "linspace"):
                cfg = full_config("ddpm", prediction_type=pred, timestep_spacing=spacing,
                                  variance_type=variance_type, **x0_mode)
                run_loop("ddpm", cfg, steps=4, dtype=dtype)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_schedules_offsets_zero_snr_trained_betas(kind):
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["sigmoid", "laplace"] if kind == "ddpm" else [])
    for schedule in schedules:
        run_loop(kind, full_config(kind, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012), steps=5,
                 eta=1.0)
    for offset in (1, 3):
        run_loop(kind, full_config(kind, steps_offset=offset), steps=7, eta=0.5)
    for pred in ("v_prediction", "sample"):
        for spacing in ("trailing", "leading"):
            run_loop(kind, full_config(kind, rescale_betas_zero_snr=True, prediction_type=pred,
                                       timestep_spacing=spacing, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012), steps=5, eta=1.0)
    betas = np.random.default_rng(3).uniform(1e-4, 0.05, size=200)
    run_loop(kind, full_config(kind, num_train_timesteps=200, trained_betas=betas.tolist()), steps=9, eta=1.0)


def test_full_length_loops():
    """Every one of 1000 steps (DDPM) / 50 steps (DDIM, eta=1) on diffusers' trajectory."""
    run_loop("ddpm", full_config("ddpm", clip_sample=True), steps=1000, shape=(1, 2, 3, 3))
    run_loop("ddim", full_config("ddim", clip_sample=True), steps=50, eta=1.0, shape=(1, 2, 3, 3))


def test_ddpm_custom_timesteps_and_no_set_timesteps():
    run_loop("ddpm", full_config("ddpm", variance_type="fixed_large"), custom=[937, 500, 499, 120, 3, 0])
    # Before set_timesteps diffusers' DDPM steps t -> t - 1 over all timesteps.
    ref, fast = make_pair("ddpm", full_config("ddpm"))
    gen = torch.Generator().manual_seed(1234)  # fixed data: diffusers' own error at t = 1 varies by draw
    x, m = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    cfg = full_config("ddpm")
    for t in (999, 500, 1):
        g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        z = randn_tensor(x.shape, generator=torch.Generator().manual_seed(t))
        r, f = ref.step(m, t, x, generator=g1), fast.step(m, t, x, generator=g2)
        o, _ = oracle("ddpm", cfg, ref.alphas_cumprod, t, t - 1, x, m, z)
        assert err(f.prev_sample, o, 1.0) <= FP32_TOL
        assert err(r.prev_sample, o, 1.0) <= 2e-4  # diffusers' float32 beta_ts cancels at t = 1
    assert fast.previous_timestep(7) == 6


@pytest.mark.parametrize("draw", range(48))
def test_random_configs(draw):
    rng = random.Random(1000 + draw)
    kind = rng.choice(["ddim", "ddpm"])
    n = rng.choice([50, 100, 1000])
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["sigmoid", "laplace"] if kind == "ddpm" else [])
    cfg = full_config(
        kind, num_train_timesteps=n, beta_schedule=rng.choice(schedules),
        beta_start=rng.choice([1e-4, 8.5e-4]), beta_end=rng.choice([0.012, 0.02]),
        clip_sample=rng.random() < 0.5, clip_sample_range=rng.choice([0.5, 1.0, 2.0]),
        prediction_type=rng.choice(PREDS), thresholding=rng.random() < 0.3,
        dynamic_thresholding_ratio=rng.choice([0.8, 0.995]), sample_max_value=rng.choice([1.0, 2.5]),
        timestep_spacing=rng.choice(["leading", "trailing", "linspace"]), rescale_betas_zero_snr=rng.random() < 0.25)
    if rng.random() < 0.2:
        cfg["trained_betas"] = [rng.uniform(1e-4, 0.03) for _ in range(n)]
    if kind == "ddim":
        cfg["set_alpha_to_one"] = rng.random() < 0.5
    else:
        cfg["variance_type"] = rng.choice(["fixed_small", "fixed_small_log", "fixed_large", "learned",
                                           "learned_range"])
    steps = rng.randint(1, 12)
    if cfg["timestep_spacing"] == "leading":
        cfg["steps_offset"] = rng.choice([0, 0, 1]) if (steps - 1) * (n // steps) + 1 < n else 0
    if cfg["rescale_betas_zero_snr"] and cfg["prediction_type"] == "epsilon":
        # alpha_bar = 0 at t = N - 1: an epsilon model cannot be stepped there (both give inf).
        cfg["timestep_spacing"], cfg["steps_offset"] = "leading", 0
        steps = max(steps, 2)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    shape = (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 7))
    run_loop(kind, cfg, steps=steps, dtype=dtype, eta=rng.choice([0.0, 0.5, 1.0]), use_clipped=rng.random() < 0.5,
             shape=shape, seed=draw)


def test_float64_samples():
    for kind in ("ddim", "ddpm"):
        run_loop(kind, full_config(kind, clip_sample=True, prediction_type="v_prediction"), steps=5,
                 dtype=torch.float64, eta=1.0)


def test_timesteps_match_diffusers():
    for n in (10, 50, 999, 1000):
        for k in sorted({1, 2, 3, 7, 9, 10, n // 3 or 1, n}):
            for spacing in ("leading", "trailing", "linspace"):
                for offset in (0, 1):
                    if spacing == "leading" and (k - 1) * (n // k) + offset >= n:
                        continue
                    for kind in ("ddim", "ddpm"):
                        ref, fast = make_pair(kind, full_config(kind, num_train_timesteps=n, timestep_spacing=spacing,
                                                                steps_offset=offset))
                        ref.set_timesteps(k)
                        fast.set_timesteps(k)
                        assert torch.equal(ref.timesteps, fast.timesteps), (n, k, spacing, offset)
                        assert fast.timesteps.dtype == torch.int64


# ------------------------------------------------------------------------------------------
# the Triton kernel (through the interpreter on CPU) on a representative subset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_subset(dtype):
    for pred, x0_mode, eta in (("epsilon", X0_MODES[1], 1.0), ("v_prediction", X0_MODES[2], 0.5),
                               ("sample", X0_MODES[0], 0.0)):
        cfg = full_config("ddim", prediction_type=pred, timestep_spacing="trailing", **x0_mode)
        run_loop("ddim", cfg, steps=3, dtype=dtype, eta=eta, use_clipped=True, backend="triton")
    for vt in ("fixed_small", "learned", "learned_range"):
        cfg = full_config("ddpm", variance_type=vt, clip_sample=True, prediction_type="v_prediction")
        run_loop("ddpm", cfg, custom=[600, 10, 0], dtype=dtype, backend="triton")


# ------------------------------------------------------------------------------------------
# noise: generators, variance_noise, in-kernel Philox


def test_generator_noise_is_diffusers_noise_bit_for_bit():
    """With noise-free arithmetic differences removed (same inputs), the noise term itself is
    diffusers': fastdiff's eta=1 output minus its eta=1 output with zero variance_noise is exactly
    std * randn_tensor(...) for the same generator (to float32 rounding of std * z)."""
    ref, fast = make_pair("ddim", full_config("ddim"))
    ref.set_timesteps(10)
    fast.set_timesteps(10)
    x, m = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    copies = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    z = randn_tensor(x.shape, generator=copies, dtype=x.dtype)
    noisy = fast.step(m, 500, x, eta=1.0, generator=gens).prev_sample
    clean = fast.step(m, 500, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    ab = ref.alphas_cumprod.double()
    std = ((1 - ab[400]) / (1 - ab[500]) * (1 - ab[500] / ab[400])).sqrt()
    assert err(noisy - clean, std * z.double(), 1.0) <= FP32_TOL
    assert all(torch.equal(g.get_state(), c.get_state()) for g, c in zip(gens, copies))
    with pytest.raises(ValueError, match="generator and variance_noise"):
        fast.step(m, 500, x, eta=1.0, generator=gens[0], variance_noise=z)


def test_ddpm_draws_only_where_diffusers_draws():
    fast = DDPMScheduler()
    fast.set_timesteps(timesteps=[10, 0])
    g, g0 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 3)
    fast.step(torch.randn_like(x), fast.timesteps[1], x, generator=g)  # t = 0: no draw
    assert torch.equal(g.get_state(), g0.get_state())
    fast.step(torch.randn_like(x), fast.timesteps[0], x, generator=g)
    assert not torch.equal(g.get_state(), g0.get_state())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_philox_seed_noise(backend):
    """In-kernel noise: deterministic in the seed, different across seeds and timesteps, and
    distributed as std * N(0, 1) around the noise-free update."""
    fast = DDIMScheduler(clip_sample=False)
    fast.backend = backend
    fast.set_timesteps(10)
    shape = (4, 3, 16, 16)
    x, m = torch.randn(shape), torch.randn(shape)
    clean = fast.step(m, 500, x, eta=1.0, variance_noise=torch.zeros(shape)).prev_sample
    fast.set_noise_seed(123)
    a = fast.step(m, 500, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    b = fast.step(m, 500, x, eta=1.0).prev_sample
    c = fast.step(m, 400, x, eta=1.0).prev_sample
    fast.set_noise_seed(124)
    d = fast.step(m, 500, x, eta=1.0).prev_sample
    assert torch.equal(a, b)  # the seed wins over a generator
    assert not torch.equal(b, d) and not torch.equal(b, c)
    ab = fast.alphas_cumprod.double()
    std = ((1 - ab[400]) / (1 - ab[500]) * (1 - ab[500] / ab[400])).sqrt().item()
    zhat = ((b.double() - clean.double()) / std).flatten()
    n = zhat.numel()
    assert abs(zhat.mean().item()) < 5 / math.sqrt(n)
    assert abs(zhat.std().item() - 1) < 5 / math.sqrt(2 * n)
    fast.set_noise_seed(None)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ref = diffusers.DDIMScheduler(clip_sample=False)
    ref.set_timesteps(10)
    assert err(fast.step(m, 500, x, eta=1.0, generator=g1).prev_sample,
               ref.step(m, 500, x, eta=1.0, generator=g2).prev_sample, 10.0) <= FP32_TOL
    with pytest.raises(ValueError, match="seed"):
        fast.set_noise_seed(-1)


def test_philox_seed_torch_and_triton_agree():
    outs = []
    for backend in ("torch", "triton"):
        fast = DDPMScheduler(variance_type="fixed_large")
        fast.backend = backend
        fast.set_timesteps(5)
        fast.set_noise_seed(77)
        x, m = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)), \
            torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
        outs.append(fast.step(m, fast.timesteps[1], x).prev_sample)
    assert err(outs[0], outs[1], 1.0) <= 1e-5


def test_fixed_large_log_is_fixed_large_not_nan():
    """diffusers' fixed_large_log takes sqrt(log(beta)) and returns NaN on every noisy step;
    fastdiff gives the variance the name means (GLIDE's max_log: variance beta), fixed_large."""
    ref_log = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    ref_large = diffusers.DDPMScheduler(variance_type="fixed_large")
    fast = DDPMScheduler.from_config(ref_log.config)
    for s in (ref_log, ref_large, fast):
        s.set_timesteps(10)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = {}
    for name, s in (("log", ref_log), ("large", ref_large), ("fast", fast)):
        out[name] = s.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(out["log"]).all()
    assert err(out["fast"], out["large"], 1.0) <= FP32_TOL


# ------------------------------------------------------------------------------------------
# API surface: config round trips, signatures, attributes, errors


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_config_round_trips(tmp_path):
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction", timestep_spacing="trailing",
                                  rescale_betas_zero_snr=True)
    fast = DDIMScheduler.from_config(ref.config)
    assert public(fast.config) == public(ref.config)
    assert isinstance(fast, diffusers.DDIMScheduler)
    assert fast._compatibles == ref._compatibles and fast.compatibles
    fast.save_pretrained(tmp_path / "fast")
    assert public(diffusers.DDIMScheduler.from_pretrained(tmp_path / "fast").config) == public(ref.config)
    ref.save_pretrained(tmp_path / "ref")
    loaded = DDIMScheduler.from_pretrained(tmp_path / "ref")
    assert type(loaded) is DDIMScheduler and public(loaded.config) == public(ref.config)
    # A Stable-Diffusion-style config from another scheduler class converts as diffusers' does.
    pndm = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   skip_prk_steps=True, steps_offset=1)
    for fast_cls, ref_cls in ((DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler)):
        f, r = fast_cls.from_config(pndm.config), ref_cls.from_config(pndm.config)
        assert public(f.config) == public(r.config)
        assert torch.equal(f.alphas_cumprod, r.alphas_cumprod)
    ddpm = DDPMScheduler(variance_type="learned_range", num_train_timesteps=300)
    ddpm.save_pretrained(tmp_path / "ddpm")
    assert public(diffusers.DDPMScheduler.from_pretrained(tmp_path / "ddpm").config) == public(ddpm.config)


def test_signatures_and_attributes():
    for fast_cls, ref_cls in ((DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler)):
        fast, ref = fast_cls(), ref_cls()
        f_params = list(inspect.signature(fast.step).parameters)
        r_params = list(inspect.signature(ref.step).parameters)
        assert f_params[:len(r_params)] == r_params
        assert list(inspect.signature(fast.set_timesteps).parameters) == \
            list(inspect.signature(ref.set_timesteps).parameters)
        assert fast.init_noise_sigma == ref.init_noise_sigma == 1.0
        assert fast.order == ref.order == 1
        assert len(fast) == len(ref) == 1000
        x = torch.randn(2, 3)
        assert fast.scale_model_input(x, 10) is x
        fast.set_begin_index(3)
        assert fast.begin_index == 3
        assert torch.equal(fast.timesteps, ref.timesteps)
    # What pipelines' prepare_extra_step_kwargs look for.
    assert {"eta", "generator"} <= set(inspect.signature(DDIMScheduler.step).parameters)
    assert "generator" in inspect.signature(DDPMScheduler.step).parameters


def test_add_noise_bit_identical():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ref, fast = make_pair("ddpm", full_config("ddpm", beta_schedule="squaredcos_cap_v2"))
        x0, noise = torch.randn(4, 3, 5, 5).to(dtype), torch.randn(4, 3, 5, 5).to(dtype)
        t = torch.tensor([0, 17, 500, 999])
        assert torch.equal(fast.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
        assert torch.equal(fast.add_noise(x0[:1], noise[:1], torch.tensor(250)),
                           ref.add_noise(x0[:1], noise[:1], torch.tensor(250)))


def test_return_tuple_and_mixed_dtypes():
    ref, fast = make_pair("ddim", full_config("ddim"))
    ref.set_timesteps(10)
    fast.set_timesteps(10)
    x, m = torch.randn(2, 3, 4, 4, dtype=torch.float16), torch.randn(2, 3, 4, 4)
    f = fast.step(m, 300, x, return_dict=False)
    r = ref.step(m, 300, x, return_dict=False)
    assert isinstance(f, tuple) and len(f) == 2
    assert f[0].dtype == r[0].dtype == torch.float32
    assert err(f[0], r[0], 1.0) <= FP32_TOL


def test_errors_name_the_constraint():
    ddim = DDIMScheduler()
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(x, 10, x)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, num_train_timesteps=1000\)"):
        ddim.step(x, 1000, x)
    with pytest.raises(ValueError, match="same shape"):
        ddim.step(torch.randn(1, 2, 3, 4), 10, x)
    with pytest.raises(ValueError, match="eta must be"):
        ddim.step(x, 10, x, eta=-0.5)
    with pytest.raises(TypeError, match="integer"):
        ddim.step(x, torch.tensor(10.0), x)
    with pytest.raises(ValueError, match="one value"):
        ddim.step(x, torch.tensor([10, 10]), x)
    with pytest.raises(ValueError, match="variance_noise"):
        ddim.step(x, 10, x, eta=1.0, variance_noise=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="cannot be larger"):
        ddim.set_timesteps(1001)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="bogus").set_timesteps(5)
    ddpm = DDPMScheduler(variance_type="learned_range")
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="twice the sample's channels"):
        ddpm.step(x, 900, x)
    ddpm.step(x, 0, x)  # no noise at t = 0: the variance half is not needed (as in diffusers)
    with pytest.raises(ValueError, match="descending"):
        ddpm.set_timesteps(timesteps=[5, 9, 1])
    with pytest.raises(ValueError, match="only pass one"):
        ddpm.set_timesteps(5, timesteps=[9, 1])
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="bogus").step(x, 5, x)


# ------------------------------------------------------------------------------------------
# GPU: no host sync in a loop with device timesteps (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_no_host_sync_on_gpu(kind):
    dev = torch.device("cuda")
    fast = DDIMScheduler(thresholding=True) if kind == "ddim" else DDPMScheduler(variance_type="fixed_large")
    fast.set_timesteps(10, device=dev)
    fast.set_noise_seed(1)
    x = torch.randn(2, 4, 32, 32, device=dev)
    m = torch.randn_like(x)
    kw = dict(eta=1.0) if kind == "ddim" else {}
    fast.step(m, fast.timesteps[0], x, **kw)  # first call: caches (row ids, seed tensor)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in fast.timesteps:
            x = fast.step(m, t, x, **kw).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_gpu_kernel_matches_float64(kind, dtype):
    """The compiled kernel on the GPU, device timesteps, against the float64 oracle."""
    dev = torch.device("cuda")
    cfg = full_config(kind, clip_sample=True, prediction_type="v_prediction", thresholding=kind == "ddim",
                      dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    ref, fast = make_pair(kind, cfg)
    fast.set_timesteps(20, device=dev)
    ref.set_timesteps(20)
    ts = ref.timesteps.tolist()
    x = torch.randn(2, 4, 33, 31, device=dev).to(dtype)
    for i, t in enumerate(fast.timesteps):
        m = torch.randn(x.shape, device=dev).to(dtype)
        z = torch.randn(x.shape, device=dev).to(dtype)
        if kind == "ddim":
            f = fast.step(m, t, x, eta=1.0, variance_noise=z)
            prev = ts[i] - 1000 // 20
        else:
            f = fast.step(m, t, x, variance_noise=z)
            prev = ts[i + 1] if i + 1 < len(ts) else -1
        o, o_x0 = oracle(kind, cfg, ref.alphas_cumprod, ts[i], prev, x.cpu(), m.cpu(), z.cpu(), eta=1.0)
        for fv, ov in ((f.prev_sample, o), (f.pred_original_sample, o_x0)):
            scale = max(1.0, ov.abs().max().item())
            assert err(fv.cpu(), ov, scale) <= tolerance(dtype), (kind, dtype, ts[i])
        x = f.prev_sample


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_gpu_timestep_not_from_scheduler(kind):
    """A GPU timestep tensor that is not an element of scheduler.timesteps (its value cannot be
    read without a sync) indexes the table on the device and gives the same update."""
    dev = torch.device("cuda")
    fast = DDIMScheduler() if kind == "ddim" else DDPMScheduler()
    fast.set_timesteps(10, device=dev)
    x = torch.randn(2, 3, 8, 8, device=dev)
    m, z = torch.randn_like(x), torch.randn_like(x)
    kw = dict(eta=1.0) if kind == "ddim" else {}
    for t in fast.timesteps:
        a = fast.step(m, t, x, variance_noise=z, **kw).prev_sample
        b = fast.step(m, t.clone(), x, variance_noise=z, **kw).prev_sample
        # Equal up to how the compiler contracts the final noise term (std = 0 at t = 0).
        assert err(a.cpu(), b.cpu(), 1.0) <= 1e-6



def test_timesteps_edited_or_reassigned_by_the_caller():
    """In-place edits and reassigned lists are re-read (not served from a stale host copy), and
    DDPM before set_timesteps steps t -> t - 1 whatever .timesteps holds, as diffusers does."""
    cfg = full_config("ddpm")
    gen = torch.Generator().manual_seed(7)
    x, m = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    ref, fast = make_pair("ddpm", cfg)
    for s in (ref, fast):
        s.set_timesteps(10)
        s.timesteps += 1  # e.g. a caller shifting the schedule in place
    t = int(ref.timesteps[0])
    r = ref.step(m, t, x, generator=torch.Generator().manual_seed(0))
    f = fast.step(m, t, x, generator=torch.Generator().manual_seed(0))
    o, _ = oracle("ddpm", cfg, ref.alphas_cumprod, t, int(ref.timesteps[1]), x, m,
                  randn_tensor(x.shape, generator=torch.Generator().manual_seed(0)))
    assert err(f.prev_sample, o, 1.0) <= FP32_TOL and err(r.prev_sample, o, 1.0) <= 2e-4
    ref, fast = make_pair("ddpm", cfg)
    for s in (ref, fast):
        s.timesteps = torch.tensor([999, 500, 0])  # assigned, not via set_timesteps
    r = ref.step(m, 999, x, generator=torch.Generator().manual_seed(1))
    f = fast.step(m, 999, x, generator=torch.Generator().manual_seed(1))
    assert fast.previous_timestep(999) == ref.previous_timestep(999) == 998
    assert err(f.prev_sample, r.prev_sample, 1.0) <= 2e-4


def test_storage_offset_shortcut_never_names_the_wrong_timestep():
    """On a GPU the timestep of `for t in scheduler.timesteps` is read from its storage offset
    (host metadata, no sync). Meta tensors stand in for CUDA here: same metadata, no data. A
    reassigned view or an in-place edit must not be read through a stale or shifted offset."""
    from fastdiff.diffusers import DDPMScheduler as FastDDPM
    fast = FastDDPM(**full_config("ddpm"))
    fast.set_timesteps(10)
    host = fast.timesteps.clone()
    fast.timesteps = fast.timesteps.to("meta")
    fast._record_timesteps(host.numpy(), "meta")  # as set_timesteps(device=meta) records them
    ts = fast.timesteps
    assert [fast._known_timestep(ts[i]) for i in range(10)] == host.tolist()
    fast.timesteps = ts[3:]  # SDEdit-style reassignment of a view
    got = [fast._known_timestep(t) for t in fast.timesteps]
    assert all(g is None or g == int(w) for g, w in zip(got, host[3:])), got
    fast._record_timesteps(host.numpy(), "meta")
    fast.timesteps.add_(1)  # in place: the host copy is stale now
    assert all(fast._known_timestep(t) is None for t in fast.timesteps)


def test_table_cache_is_bounded():
    from fastdiff.dropin import common as fd
    ref, fast = make_pair("ddim", full_config("ddim"))
    fast.set_timesteps(10)
    x, m = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    for i in range(fd._MAX_TABLES + 10):  # an eta that changes every call
        fast.step(m, int(fast.timesteps[2]), x, eta=0.01 * (i + 1), generator=torch.Generator().manual_seed(i))
    assert len(fast._fd.tables) <= fd._MAX_TABLES

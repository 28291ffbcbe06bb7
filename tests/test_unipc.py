"""UniPC (orders 1-3, bh1 / bh2, predict_x0 either way, disable_corrector) as fused rows: the drop-in
against diffusers' UniPCMultistepScheduler over its config space and random configs, both the
drop-in and the native samplers against a float64 UniPC written here, the Triton kernel, img2img
starts, latents edited between steps, the limit where diffusers' float32 formulas give NaN, no
host sync.

Bound: every step within 4e-6 of the scale max(1, max|x|) of diffusers' output (coefficients
rounded once from float64, diffusers' after every float32 operation; measured worst ~5e-7)."""
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler as Ref  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.diffusers import UniPCMultistepScheduler as Fast  # noqa: E402

TOL = 4e-6


def model(x, t):
    return torch.tanh(0.6 * x.float()) * (0.3 + float(t) / 2000.0) + 0.2 * torch.cos(x.float())


def loops(cfg, steps, *, dtype=torch.float32, backend=None, begin=None, shape=(2, 3, 5, 4), seed=0, edit=None):
    """Worst per-step difference of the drop-in's loop from diffusers', scale-relative. ``edit``:
    a function applied to the latents between steps (as inpainting pipelines do)."""
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
    worst = 0.0
    for j, t in enumerate(r.timesteps[begin or 0:]):
        xr = r.step(model(xr, t).to(dtype), t, xr).prev_sample
        xf = f.step(model(xf, t).to(dtype), t, xf).prev_sample
        assert xf.dtype == xr.dtype
        worst = max(worst, float((xr.double() - xf.double()).abs().max() / xr.double().abs().max().clamp_min(1)))
        if edit is not None:
            xr, xf = edit(xr, j), edit(xf, j)
    assert f.step_index == r.step_index and f.lower_order_nums == r.lower_order_nums
    assert not f._fd.handed_over  # the fused step ran every step (edited latents are not edited state)
    return worst


def paired(r, f, x, timesteps):
    """diffusers' scheduler ``r`` and the drop-in ``f`` stepping the same model from ``x``."""
    xr, xf = x.clone(), x.clone()
    for t in timesteps:
        xr = r.step(model(xr, t), t, xr).prev_sample
        xf = f.step(model(xf, t), t, xf).prev_sample
    return xr, xf


def diffusers_finite(cfg, steps) -> bool:
    r = Ref(**cfg)
    r.set_timesteps(steps)
    x = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))
    try:
        for t in r.timesteps:
            x = r.step(model(x, t), t, x).prev_sample
    except RuntimeError:  # torch.linalg.solve on a singular R (order > 1 onto sigma = 0)
        return False
    return bool(torch.isfinite(x).all())


CONFIGS = [
    {}, dict(solver_order=3), dict(solver_order=1), dict(solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), dict(disable_corrector=[0, 1, 4]),
    dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(prediction_type="sample", thresholding=True, sample_max_value=1.5),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, solver_order=3, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(predict_x0=False, prediction_type="sample", thresholding=True, final_sigmas_type="sigma_min"),
    # Wan's configuration: flow sigmas with a shift, velocity prediction
    dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"),
    dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_order=3,
         use_dynamic_shifting=False, final_sigmas_type="sigma_min"),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(beta_schedule="squaredcos_cap_v2", lower_order_final=False, final_sigmas_type="sigma_min"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("steps", [6, 20])
def test_config_space_matches_diffusers(cfg, steps):
    if cfg.get("predict_x0", True):
        assert loops(cfg, steps) < TOL
    else:
        noise_form_check(cfg, steps)


def noise_form_check(cfg, steps, shape=(2, 3, 5, 4), seed=0):
    """The noise-prediction form (predict_x0=False) is ill-conditioned in float32: eps_hat is
    multiplied by alpha_s / alpha_t (up to ~100 on the first steps), and with sample prediction
    eps_hat = (x - alpha x0) / sigma divides by a small sigma at the end; diffusers' float32 result
    is then up to ~5e-4 of the scale away from the float64 UniPC below, and so is fastdiff's (the
    same arithmetic, rounded elsewhere). Bound: fastdiff is no farther from float64 than twice
    diffusers' own distance (plus TOL); the table itself is checked in float64 exactly below."""
    f = Fast(**cfg)
    f.set_timesteps(steps)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    want = uni_float64(cfg, f.sigmas.double().numpy(), f.timesteps.numpy(), x_T.double().numpy(), np_model)
    r = Ref(**cfg)
    r.set_timesteps(steps)
    x = x_T.clone()
    for t in r.timesteps:
        x = r.step(model(x, t), t, x).prev_sample
    scale = max(1.0, float(np.abs(want).max()))
    ours = float(np.abs(fastdiff_loop(cfg, steps, x=x_T.clone()).double().numpy() - want).max()) / scale
    theirs = float(np.abs(x.double().numpy() - want).max()) / scale
    assert ours <= 2 * theirs + TOL, (ours, theirs)


def random_config(rnd):
    cfg = dict(solver_order=rnd.choice([1, 2, 2, 3]), solver_type=rnd.choice(["bh1", "bh2"]),
               lower_order_final=rnd.random() < 0.8, final_sigmas_type=rnd.choice(["zero", "sigma_min"]),
               timestep_spacing=rnd.choice(["linspace", "leading", "trailing"]),
               beta_schedule=rnd.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
               predict_x0=rnd.random() < 0.8)
    if rnd.random() < 0.3:
        cfg["disable_corrector"] = sorted(rnd.sample(range(8), 2))
    if cfg["predict_x0"] and rnd.random() < 0.25:
        cfg.update(use_flow_sigmas=True, flow_shift=rnd.choice([1.0, 3.0, 5.0]), prediction_type="flow_prediction")
    else:
        cfg["prediction_type"] = rnd.choice(["epsilon", "v_prediction", "sample"])
        spacing = rnd.random()
        if spacing < 0.25:
            cfg["use_karras_sigmas"] = True
        elif spacing < 0.35:
            cfg["use_exponential_sigmas"] = True
    if cfg["prediction_type"] == "sample" and rnd.random() < 0.5:
        cfg["thresholding"] = True
    return cfg


@pytest.mark.parametrize("draw", range(30))
def test_random_configs(draw):
    rnd = random.Random(900 + draw)
    cfg, steps = random_config(rnd), rnd.choice([2, 5, 10, 16, 25])
    probe = Ref(**cfg)
    probe.set_timesteps(steps)
    if int((probe.timesteps == probe.timesteps[0]).sum()) > 1:
        pytest.skip("a repeated first timestep (Karras sigmas on a cosine schedule): see test_dpm.py")
    if not diffusers_finite(cfg, steps):
        # diffusers' float32 formulas break down on the step onto sigma = 0; fastdiff takes the
        # first-order limit there (test_limit_where_diffusers_gives_nan checks it in float64)
        x = fastdiff_loop(cfg, steps)
        assert torch.isfinite(x).all(), cfg
        return
    if cfg["predict_x0"]:
        assert loops(cfg, steps, shape=(1, 2, 3, 3), seed=draw) < TOL, cfg
    else:
        noise_form_check(cfg, steps, shape=(1, 2, 3, 3), seed=draw)


# --- an independent float64 UniPC, from the paper's B(h) updates as diffusers arranges them --------

def alpha_sigma(sig, flow):
    if flow:
        return 1.0 - sig, sig
    a = 1.0 / math.sqrt(sig * sig + 1.0)
    return a, sig * a


def uni_float64(cfg, sigmas, timesteps, x, model_fn, begin=0):
    """UniPC in float64 numpy: diffusers' algorithm (convert, UniC, UniP, warm-up and lower-order
    rules), with the step onto sigma = 0 taken at first order in its limit form and a step onto the
    same sigma the identity."""
    order, bh2 = cfg.get("solver_order", 2), cfg.get("solver_type", "bh2") == "bh2"
    px0, flow = cfg.get("predict_x0", True), cfg.get("use_flow_sigmas", False)
    pred = cfg.get("prediction_type", "epsilon")
    disable, lof = cfg.get("disable_corrector", []), cfg.get("lower_order_final", True)
    k = len(timesteps)
    lam = [math.log(alpha_sigma(s, flow)[0]) - math.log(alpha_sigma(s, flow)[1]) if s > 0 else math.inf
           for s in sigmas]

    def update(ms, xs, s0, t, p, m_new=None):
        """From point s0 to t; ms[-1] = M_s0, ms[-2] = M_{s0-1}, ...; m_new: the corrector's M_t."""
        a_t, s_t = alpha_sigma(sigmas[t], flow)
        a_0, s_0 = alpha_sigma(sigmas[s0], flow)
        h = lam[t] - lam[s0]
        if math.isinf(h):
            return a_t * ms[-1] if px0 else (a_t / a_0) * (xs - s_0 * ms[-1])
        if h == 0.0:  # a repeated final sigma (final_sigmas_type "sigma_min" on Karras / flow sigmas)
            return xs
        hh = -h if px0 else h
        hphi1, bh = math.expm1(hh), (math.expm1(hh) if bh2 else hh)
        rks = [(lam[s0 - j] - lam[s0]) / h for j in range(1, p)] + [1.0]
        d = [(ms[-1 - j] - ms[-1]) / rks[j - 1] for j in range(1, p)]
        R = np.array([[r ** i for r in rks] for i in range(p)])
        b, hk, fact = [], hphi1 / hh - 1, 1.0
        for i in range(1, p + 1):
            b.append(hk * fact / bh)
            fact *= i + 1
            hk = hk / hh - 1 / fact
        base = (s_t / s_0) * xs - a_t * hphi1 * ms[-1] if px0 else (a_t / a_0) * xs - s_t * hphi1 * ms[-1]
        mult = a_t if px0 else s_t
        if m_new is None:
            rho = [0.5] if p == 2 else (list(np.linalg.solve(R[:-1, :-1], b[:-1])) if p > 2 else [])
            return base - mult * bh * sum(r * dj for r, dj in zip(rho, d))
        rho = [0.5] if p == 1 else list(np.linalg.solve(R, b))
        return base - mult * bh * (sum(r * dj for r, dj in zip(rho[:-1], d)) + rho[-1] * (m_new - ms[-1]))

    ms, last, prev_order = [], None, None
    for n, i in enumerate(range(begin, k)):
        a, s = alpha_sigma(sigmas[i], flow)
        mo = model_fn(x, timesteps[i])
        if pred == "flow_prediction":
            x0, eps = x - sigmas[i] * mo, None
        elif pred == "epsilon":
            x0, eps = (x - s * mo) / a, mo
        elif pred == "v_prediction":
            x0, eps = a * x - s * mo, a * mo + s * x
        else:
            x0, eps = mo, (x - a * mo) / s
        m = x0 if px0 else eps
        if px0 and cfg.get("thresholding"):
            q = np.quantile(np.abs(x0).reshape(x0.shape[0], -1), cfg.get("dynamic_thresholding_ratio", 0.995), axis=1)
            sb = np.clip(q, 1, cfg.get("sample_max_value", 1.0)).reshape(-1, *[1] * (x.ndim - 1))
            m = np.clip(x0, -sb, sb) / sb
        if n >= 1 and i - 1 not in disable:
            x = update(ms, last, i - 1, i, prev_order, m_new=m)
        ms = (ms + [m])[-order:]
        p = min(order, k - i) if lof else order
        p = min(p, n + 1)
        if math.isinf(lam[i + 1]):
            p = 1
        last, prev_order = x, p
        x = update(ms, x, i, i + 1, p)
    return x


def np_model(x, t):
    return model(torch.from_numpy(x), t).double().numpy()


def fastdiff_loop(cfg, steps, x=None, dtype=torch.float32):
    f = Fast(**cfg)
    f.set_timesteps(steps)
    if x is None:
        x = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0))
    x = x.to(dtype)
    for t in f.timesteps:
        x = f.step(model(x, t).to(dtype), t, x).prev_sample
    return x


@pytest.mark.parametrize("cfg", [{}, dict(solver_order=3, solver_type="bh1"), dict(predict_x0=False),
                                 dict(predict_x0=False, prediction_type="v_prediction", solver_order=3),
                                 dict(disable_corrector=[2], prediction_type="v_prediction", solver_order=3),
                                 dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction")],
                         ids=str)
def test_drop_in_and_native_vs_float64(cfg):
    """The drop-in on float64 tensors (float64 table, computed in float64) and the native sampler
    (float32) against the float64 UniPC above."""
    steps = 9
    f = Fast(**cfg)
    f.set_timesteps(steps)
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = uni_float64(cfg, f.sigmas.double().numpy(), f.timesteps.numpy(), x_T.numpy(), np_model)
    got = fastdiff_loop(cfg, steps, x=x_T, dtype=torch.float64)
    assert float(np.abs(got.numpy() - want).max() / np.abs(want).max()) < 1e-12
    native_kw = {k: v for k, v in cfg.items() if k not in ("use_flow_sigmas", "flow_shift", "prediction_type")}
    flow = cfg.get("use_flow_sigmas", False)
    if flow:
        native_kw["schedule"] = dict(shift=cfg["flow_shift"])
    elif "prediction_type" in cfg:
        native_kw["prediction_type"] = cfg["prediction_type"]
    s = fastdiff.samplers.make_sampler("flow-unipc" if flow else "unipc", steps=steps, **native_kw)
    native = s.sample(lambda x, t: model(x, t[0]), x=x_T.float())
    # the native sampler's sigmas are float64 (diffusers' are rounded to float32)
    want = uni_float64(cfg, s.sigmas, s.timesteps, x_T.numpy(), np_model)
    assert float(np.abs(native.double().numpy() - want).max() / np.abs(want).max()) < 1e-6


@pytest.mark.parametrize("cfg", [dict(solver_type="bh1"), dict(predict_x0=False), dict(predict_x0=False, solver_type="bh1"),
                                 dict(solver_order=3, lower_order_final=False), dict(lower_order_final=False)],
                         ids=str)
def test_limit_where_diffusers_gives_nan(cfg):
    """Onto sigma = 0 diffusers' float32 formulas give 0 * inf (bh1, noise prediction) or divide by
    r = 0 (order > 1 there): NaN, inf or a singular solve. fastdiff's step there is the first-order
    limit, x0_hat: finite, and equal to the float64 UniPC above."""
    assert not diffusers_finite(cfg, 8)
    f = Fast(**cfg)
    f.set_timesteps(8)
    x_T = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = uni_float64(cfg, f.sigmas.double().numpy(), f.timesteps.numpy(), x_T.numpy(), np_model)
    got = fastdiff_loop(cfg, 8, x=x_T, dtype=torch.float64)
    assert np.isfinite(want).all() and float(np.abs(got.numpy() - want).max() / np.abs(want).max()) < 1e-12
    assert torch.isfinite(fastdiff_loop(cfg, 8)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    # diffusers keeps its predictions and corrected samples in the model's dtype; fastdiff in float32
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert loops(dict(use_karras_sigmas=True), 10, dtype=dtype) < 4 * ulp


def test_triton_kernel():
    for cfg in (dict(solver_order=3), dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction",
                                           disable_corrector=[1])):
        assert loops(cfg, 6, backend="triton", shape=(2, 3, 4)) < TOL


def test_img2img_start_warms_up_from_the_first_step():
    for cfg in ({}, dict(solver_order=3)):
        assert loops(cfg, 12, begin=5) < TOL
    # without set_begin_index: the first timestep passed names the start (diffusers' lookup)
    r, f = Ref(solver_order=3), Fast(solver_order=3)
    for s in (r, f):
        s.set_timesteps(10)
    xr, xf = paired(r, f, torch.randn(2, 3, generator=torch.Generator().manual_seed(1)), r.timesteps[4:])
    assert float((xr - xf).abs().max() / xr.abs().max()) < TOL


def test_latents_edited_between_steps():
    """Inpainting pipelines blend the latents with the noised original after each step. diffusers'
    corrector then starts from its last_sample (the corrected sample it kept), not from the edited
    latents; the drop-in reads the corrected sample it wrote, so the two agree."""
    keep = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(9))
    mask = (torch.arange(4) < 2).float()

    def blend(x, j):
        return mask * x + (1 - mask) * keep * (0.9 - 0.05 * j)

    assert loops({}, 10, edit=blend) < TOL
    assert loops(dict(solver_order=3), 8, edit=lambda x, j: x.mul_(0.98)) < TOL  # an in-place edit too


def test_unserved_configs_run_diffusers_step():
    for cfg in (dict(solver_order=4, final_sigmas_type="sigma_min"),):
        assert loops(cfg, 8) == 0.0  # diffusers' own arithmetic: bit for bit
    solver_p = diffusers.DDIMScheduler()
    r, f = Ref(solver_p=solver_p), Fast(solver_p=diffusers.DDIMScheduler())
    for s in (r, f):
        s.set_timesteps(6)
    xr, xf = paired(r, f, torch.randn(2, 3, generator=torch.Generator().manual_seed(2)), r.timesteps)
    assert torch.equal(xr, xf)


def test_native_sampler_equals_the_drop_in_loop():
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for name, cfg, native_cfg in (
            ("unipc", dict(use_karras_sigmas=True), dict(use_karras_sigmas=True)),
            ("unipc", dict(solver_order=3, disable_corrector=[0, 3]), dict(solver_order=3, disable_corrector=[0, 3])),
            ("flow-unipc", dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"),
             dict(schedule=dict(shift=5.0)))):
        native = fastdiff.sample(lambda x, t: model(x, t[0]), x=x_T, sampler=name, steps=9, **native_cfg)
        f = Fast(**cfg)
        f.set_timesteps(9)
        x = x_T.clone()
        for t in f.timesteps:
            x = f.step(model(x, t), t, x).prev_sample
        # The native sampler steps with float64 sigmas, diffusers' are rounded to float32 (Karras:
        # 2.4e-4 at sigma 79): the two loops differ by that, ~5e-6 of the scale, not by float32 rounding.
        assert float((native - x).abs().max() / x.abs().max().clamp_min(1)) < 2e-5, name


def test_native_errors_and_swap():
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        fastdiff.sample(lambda x, t: x, (1, 2), sampler="unipc", steps=5, solver_order=4)
    with pytest.raises(ValueError, match="solver_type must be 'bh1' or 'bh2'"):
        fastdiff.sample(lambda x, t: x, (1, 2), sampler="unipc", steps=5, solver_type="midpoint")
    with pytest.raises(ValueError, match="needs predict_x0=True"):
        fastdiff.sample(lambda x, t: x, (1, 2), sampler="unipc", steps=5, predict_x0=False, thresholding=True)
    with pytest.raises(ValueError, match="flow path: use sampler='flow-unipc'"):
        fastdiff.sample(lambda x, t: x, (1, 2), sampler="unipc", steps=5, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="explicit sigmas list"):
        fastdiff.sample(lambda x, t: x, (1, 2), sampler="flow-unipc", steps=5, schedule=dict(use_karras_sigmas=True))

    class Pipe:
        scheduler = Ref(solver_order=3)

    pipe = fastdiff.diffusers.swap_scheduler(Pipe())
    assert type(pipe.scheduler) is Fast and pipe.scheduler.config.solver_order == 3


def test_no_host_sync_per_step(request):
    f = Fast(solver_order=3)
    f.set_timesteps(6)
    x = torch.randn(2, 3)
    ts = list(f.timesteps)
    reads = request.getfixturevalue("host_reads")
    for t in ts:
        x = f.step(x * 0.1, t, x).prev_sample
    assert reads.stop() == []


def test_custom_flow_sigmas_and_dynamic_shifting():
    """set_timesteps(sigmas=...) (flow sigmas only, as diffusers) and mu with use_dynamic_shifting."""
    sig = np.linspace(1.0, 0.05, 9)
    for cfg, kw in ((dict(use_flow_sigmas=True, prediction_type="flow_prediction"), dict(sigmas=sig)),
                    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True),
                     dict(num_inference_steps=7, mu=0.8))):
        r, f = Ref(**cfg), Fast(**cfg)
        r.set_timesteps(**kw)
        f.set_timesteps(**kw)
        assert torch.equal(r.sigmas, f.sigmas) and torch.equal(r.timesteps, f.timesteps)
        xr, xf = paired(r, f, torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4)), r.timesteps)
        assert float((xr - xf).abs().max() / xr.abs().max().clamp_min(1)) < TOL


def test_state_attributes_and_a_pipeline_that_edits_them():
    """model_outputs, last_sample, this_order and lower_order_nums are diffusers' after every
    step (views of the fused step's buffers). A pipeline that slices them mid-loop (ChronoEdit
    keeps frames [0, -1] of the latents and of that state) or changes the latents' batch or dtype
    gets diffusers' own step from then on, from that state: the same samples as diffusers."""
    cfg = dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction", solver_order=3)
    runs = {}
    for cls in (Ref, Fast):
        s = cls(**cfg)
        s.set_timesteps(8)
        lat = torch.randn(1, 2, 5, 3, 3, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(s.timesteps):
            if i == 3:  # ChronoEdit's loop body
                lat = lat[:, :, [0, -1]]
                s.model_outputs = [mo[:, :, [0, -1]] if mo is not None else None for mo in s.model_outputs]
                s.last_sample = s.last_sample[:, :, [0, -1]]
            lat = s.step(model(lat, t), t, lat).prev_sample
            if i == 1:
                state = (s.this_order, s.lower_order_nums, [mo is not None for mo in s.model_outputs],
                         s.last_sample.clone(), [mo.clone() for mo in s.model_outputs if mo is not None])
                runs.setdefault("state", []).append(state)
        runs[cls] = lat
    (a, b) = runs["state"]
    assert a[:3] == b[:3]
    assert float((a[3] - b[3]).abs().max()) < 1e-5 and all(float((u - v).abs().max()) < 1e-5 for u, v in zip(a[4], b[4]))
    assert float((runs[Ref] - runs[Fast]).abs().max() / runs[Ref].abs().max()) < TOL
    for change in (lambda x: torch.cat([x, x]), lambda x: x.double()):  # batch, dtype mid-loop
        out = {}
        for cls in (Ref, Fast):
            s = cls()
            s.set_timesteps(6)
            x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(1))
            for i, t in enumerate(s.timesteps):
                if i == 3:
                    x = change(x)
                x = s.step(model(x, t), t, x).prev_sample
            out[cls] = x
        assert out[Ref].dtype == out[Fast].dtype and out[Ref].shape == out[Fast].shape
        assert float((out[Ref] - out[Fast]).abs().max() / out[Ref].abs().max()) < TOL


def test_non_integer_timestep_finds_diffusers_step():
    for t in (999.5, torch.tensor(999.5)):
        r, f = Ref(), Fast()
        for s in (r, f):
            s.set_timesteps(10)
            s.step(torch.zeros(1, 2), t, torch.zeros(1, 2))
        assert r.step_index == f.step_index


def test_flow_prediction_on_vp_sigmas_runs_diffusers_step():
    """diffusers converts a velocity with the raw VP sigma sqrt((1 - ab)/ab) there (not a path the
    step knows): the drop-ins hand that mix to diffusers' own step, bit for bit."""
    from diffusers import DPMSolverMultistepScheduler as RefDPM
    from fastdiff.diffusers import DPMSolverMultistepScheduler as FastDPM
    for ref_cls, fast_cls in ((Ref, Fast), (RefDPM, FastDPM)):
        r, f = ref_cls(prediction_type="flow_prediction"), fast_cls(prediction_type="flow_prediction")
        for s in (r, f):
            s.set_timesteps(6)
        xr, xf = paired(r, f, torch.randn(2, 3, generator=torch.Generator().manual_seed(2)), r.timesteps)
        assert torch.equal(xr, xf)

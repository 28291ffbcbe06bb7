"""OCM: the fused kernel on the OCM samplers' tables (interpreter and torch) against float64
written here from alpha_bar, the samplers' head plumbing, the covariance-matching objective
against the exact h of the test bed, a briefly trained head, and OCM-DDPM vs DDPM quality."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.engine.kernels import philox
from fastdiff.engine.step import step as vp_step
from fastdiff.samplers.ocm import OCMDDIMSampler, OCMDDPMSampler, second_to_last_var_cap
from fastdiff.training.ocm import MLPHead, ProbeHead, ocm_loss, ocm_target, train_head
from fastdiff.testbed import GaussianMixture, frechet_distance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Bound on max|err| / max|want|: fp32 arithmetic amplified by 1/sqrt(ab_t), and for half types
# the rounding of inputs and output (fp16 2**-11; bf16 2**-8, truncation in the interpreter 2**-7).
TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}


def f64_ocm_step(x, m, h, z, ab, t, s, *, kind, eta=0.0, cov_max=1.0, var_max=math.inf, final=False):
    """Float64 OCM update x_t -> x_s (epsilon prediction) from alpha_bar, per docs/design.md / Ou et al."""
    x, m, h, z = x.double(), m.double(), h.double(), z.double()
    a_t = float(ab[t])
    a_s = float(ab[s]) if s >= 0 else 1.0
    x0 = (x - math.sqrt(1 - a_t) * m) / math.sqrt(a_t)
    beta_ts = 1 - a_t / a_s
    tilde = (1 - a_s) / (1 - a_t) * beta_ts
    if kind == "ddpm":
        mean = math.sqrt(a_s) * beta_ts / (1 - a_t) * x0 + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x
        base, coef = tilde, math.sqrt(a_s) * beta_ts / (1 - a_t)
    else:
        lam2 = eta ** 2 * tilde
        mean = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - lam2) * m
        base, coef = lam2, math.sqrt(a_s) - math.sqrt(1 - a_s - lam2) * math.sqrt(a_t / (1 - a_t))
    sigma0 = ((1 - a_t) / a_t * (1 + h)).clamp(0, cov_max)
    var = (base + coef ** 2 * sigma0).clamp(max=var_max)
    return mean if final else mean + var.sqrt() * z


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _noncontig(t):
    # Same values, transposed storage: exercises the kernel's strided path.
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_ocm_tables_vs_float64(kind, eta, dtype):
    """Every row of an OCM sampler's table (incl. the clipped second-to-last and the noise-free
    last), cov_max != 1, odd non-contiguous shapes, Triton interpreter and torch reference."""
    sched = fastdiff.Schedule("linear")
    ab = sched.alphas_cumprod.numpy()
    cls = OCMDDPMSampler if kind == "ddpm" else OCMDDIMSampler
    kw = {} if kind == "ddpm" else {"eta": eta}
    sampler = cls(sched, 6, timestep_spacing="linspace", cov_max=0.05, clip_pixels=3, **kw)
    table = sampler.table.on("cpu")
    ts, prev = sampler.timesteps, sampler.prev_timesteps
    gen = torch.Generator().manual_seed(3)
    shape = (3, 5, 7)
    for i in range(sampler.steps):
        x, m, z = (_noncontig(_rand(shape, dtype, gen)) for _ in range(3))
        h = _noncontig((torch.rand(shape, generator=gen) * 3.0 - 1.5).to(dtype))  # 1 + h < 0 clamps at 0
        assert not x.is_contiguous()
        var_max = second_to_last_var_cap(3) if i == sampler.steps - 2 else math.inf
        want = f64_ocm_step(x, m, h, z, ab, int(ts[i]), int(prev[i]), kind=kind, eta=eta, cov_max=0.05,
                            var_max=var_max, final=i == sampler.steps - 1)
        step = torch.tensor([i])
        outs = []
        for backend in ("triton", "torch"):
            got = vp_step(x, m, table, step, noise=z, var_mode="ocm", aux=h, cov_max=0.05, backend=backend)
            err = float((got.double() - want).abs().max() / want.abs().max())
            assert got.dtype == dtype and err < TOL[dtype], (backend, i, err)
            outs.append(got.double())
        # kernel vs its reference: the same fp32 arithmetic, so within one rounding of the output dtype
        ulp = {torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
        assert float((outs[0] - outs[1]).abs().max()) <= ulp * float(want.abs().max())


def test_kernel_philox_ocm_matches_reference():
    """In-kernel noise in OCM mode: interpreter vs torch reference on an odd batch offset."""
    sampler = OCMDDIMSampler(None, 5, eta=0.0, head=lambda x, t: x)
    table = sampler.table.on("cpu")
    gen = torch.Generator().manual_seed(5)
    x, m = _rand((3, 33), torch.float32, gen), _rand((3, 33), torch.float32, gen)
    h = torch.rand(3, 33, generator=gen) - 0.5
    seed, step = torch.tensor([123]), torch.tensor([1])
    a = vp_step(x, m, table, step, seed=seed, sample_offset=7, var_mode="ocm", aux=h, backend="triton")
    b = vp_step(x, m, table, step, seed=seed, sample_offset=7, var_mode="ocm", aux=h, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    mean = vp_step(x, m, table, step, var_mode="table", backend="torch")  # DDIM eta=0: the mean
    assert float((a - mean).abs().max()) > 1e-3  # OCM-DDIM at eta = 0 still injects noise


def test_tables_noise_flags_and_clip():
    s = OCMDDIMSampler(None, 8, eta=0.0, clip_pixels=2)
    tab = s.table.host
    col = {n: i for i, n in enumerate(fastdiff.COLUMNS)}
    assert np.all(tab[:-1, col["noise"]] == 1) and tab[-1, col["noise"]] == 0
    assert tab[-2, col["var_max"]] == pytest.approx((2 * 2 / 255 * math.sqrt(math.pi / 2)) ** 2)
    assert np.all(np.isinf(np.delete(tab[:, col["var_max"]], -2)))
    assert s.uses_noise
    assert np.all(np.isinf(OCMDDPMSampler(None, 8).table.host[:, col["var_max"]]))
    with pytest.raises(ValueError, match="fixed_small"):
        OCMDDPMSampler(None, 8, variance_type="fixed_large")
    with pytest.raises(ValueError, match="cov_max"):
        OCMDDPMSampler(None, 8, cov_max=0)
    with pytest.raises(TypeError, match="head must be a callable"):
        OCMDDPMSampler(None, 8, head=3)


def test_sigma0_zero_reduces_to_base_samplers():
    """h = -1 means Sigma0 = 0: OCM-DDPM is DDPM (same Philox noise), OCM-DDIM(eta) is DDIM(eta)."""
    gm = GaussianMixture.random(6, 3, seed=1)
    minus_one = lambda x, t: torch.full_like(x, -1.0)  # noqa: E731
    for base, ocm in [(fastdiff.DDPMSampler(None, 12), OCMDDPMSampler(None, 12, head=minus_one)),
                      (fastdiff.DDIMSampler(None, 12, eta=0.7), OCMDDIMSampler(None, 12, eta=0.7, head=minus_one))]:
        a = base.sample(gm.model(), (40, 6), seed=4)
        b = ocm.sample(gm.model(), (40, 6), seed=4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_head_conventions_agree_and_errors_are_clear():
    gm = GaussianMixture.random(5, 3, seed=2)
    a = fastdiff.sample(gm.model(), (30, 5), sampler="ocm-ddpm", steps=10, seed=1, head=gm.head())
    b = fastdiff.sample(gm.model(return_h=True), (30, 5), sampler="ocm-ddpm", steps=10, seed=1)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    c = OCMDDIMSampler(None, 10, backend="triton").sample(gm.model(return_h=True), (30, 5), seed=1)
    d = OCMDDIMSampler(None, 10, backend="torch").sample(gm.model(return_h=True), (30, 5), seed=1)
    torch.testing.assert_close(c, d, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="return \\(output, h\\)"):
        OCMDDPMSampler(None, 5).sample(gm.model(), (4, 5))


def test_one_ocm_ddpm_step_by_hand():
    """Two steps with x_T given, against float64 from alpha_bar with the same Philox normals."""
    gm = GaussianMixture.random(4, 2, seed=6)
    s = OCMDDPMSampler(None, 2, timestep_spacing="linspace", head=gm.head(), cov_max=None)
    xT = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    got = s.sample(gm.model(), x=xT, seed=9)
    ab = s.schedule.alphas_cumprod.numpy()
    t0, t1 = int(s.timesteps[0]), int(s.timesteps[1])
    g = philox.global_indices((8, 4), 0, torch.device("cpu"))
    z = philox.normals_torch(torch.tensor(9), g, torch.tensor(0), philox.STREAM_STEP)
    # The model hands the kernel fp32 eps and h; at t = 999 Sigma0 = (sigma^2/ab)(1 + h) multiplies
    # the fp32 rounding of h by sigma^2/ab ~ 2.5e4, so the reference takes the same fp32 inputs.
    x = xT
    x1 = f64_ocm_step(x, gm.eps(x, t0), gm.h(x, t0), z, ab, t0, t1, kind="ddpm", cov_max=math.inf).float()
    want = f64_ocm_step(x1, gm.eps(x1, t1), gm.h(x1, t1), z, ab, t1, -1, kind="ddpm", final=True)
    # fp32 step arithmetic: a few roundings of |x| amplified by 1/sqrt(ab_t) (~156 at t = 999).
    tol = 8 * 2.0 ** -24 / math.sqrt(float(ab[t0])) * float(xT.abs().max())
    assert float((got.double() - want).abs().max()) < tol


def test_objective_estimate_converges_to_exact_h():
    """ocm_target is unbiased: its average over P probes approaches the exact h like 1/sqrt(P)."""
    gm = GaussianMixture.random(5, 4, std_range=(0.05, 0.3), seed=8)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([50, 200, 400, 600, 800, 950] * 4)
    _, xt, _ = gm.sample_xt(len(t), t, g)
    exact = gm.h(xt, t)
    model = gm.model()
    singles = torch.stack([ocm_target(model, xt, t, gm.schedule, generator=g) for _ in range(64)])
    mean, se = singles.mean(0), singles.std(0) / 8
    # unbiased: the 64-probe mean lies within 5 standard errors (+ fp noise) of the exact h
    assert bool(((mean - exact).abs() <= 5 * se + 1e-6).all())
    # a 256-probe average in one call is close in RMS (bound set from the probe variance seen here)
    est = ocm_target(model, xt, t, gm.schedule, probes=256, generator=g)
    rms = float(((est - exact) ** 2).mean().sqrt())
    assert rms < 1.5 * float((singles.var(0).mean() / 256).sqrt()) + 1e-6
    assert rms < 0.05 * float(exact.abs().mean())
    assert float(ocm_loss(exact, est)) == pytest.approx(rms ** 2, rel=1e-9)


def test_objective_reads_every_prediction_type():
    """The probe target is a function of the score only: v- and x0-prediction networks of the
    same mixture give the epsilon network's target (same probes), for a scalar t too."""
    gm = GaussianMixture.random(4, 3, seed=4)
    _, xt, _ = gm.sample_xt(6, 300, torch.Generator().manual_seed(0))
    want = ocm_target(gm.model(), xt, 300, generator=torch.Generator().manual_seed(5), probes=3)
    for pred in ("v_prediction", "sample"):
        got = ocm_target(gm.model(pred), xt, 300, prediction_type=pred, generator=torch.Generator().manual_seed(5),
                         probes=3)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_probe_head_in_a_sampler():
    """The training-free head (8 probes) gives samples close to the exact head's."""
    gm = GaussianMixture.random(3, 3, seed=3)
    x_exact = OCMDDPMSampler(None, 10, head=gm.head()).sample(gm.model(), (64, 3), seed=2)
    x_probe = OCMDDPMSampler(None, 10, head=ProbeHead(gm.model(), probes=8)).sample(gm.model(), (64, 3), seed=2)
    with torch.no_grad():  # the probe head re-enables grad for its own VJPs
        x_probe2 = OCMDDPMSampler(None, 10, head=ProbeHead(gm.model(), probes=8)).sample(gm.model(), (64, 3), seed=2)
    torch.testing.assert_close(x_probe, x_probe2)
    with torch.inference_mode():  # inference tensors: the probe head must still differentiate
        x_probe3 = OCMDDPMSampler(None, 10, head=ProbeHead(gm.model(), probes=8)).sample(gm.model(), (64, 3), seed=2)
    torch.testing.assert_close(x_probe, x_probe3)
    # No covariance at all (h = -1, plain DDPM's variance) lands ~0.011 away from the exact head,
    # the 8-probe head ~0.0014: the bound sits between the two, so a head that ignores h fails.
    no_cov = OCMDDPMSampler(None, 10, head=lambda x, t: torch.full_like(x, -1.0)).sample(gm.model(), (64, 3), seed=2)
    d_probe = float((x_exact - x_probe).abs().mean())
    d_none = float((x_exact - no_cov).abs().mean())
    assert d_probe < 0.004 and d_probe < 0.4 * d_none, (d_probe, d_none)


def test_trained_head_lands_near_exact_h():
    """A small MLP head trained 600 steps by covariance matching on a 2-d mixture: its relative
    MSE against the exact h (over t uniform, x_t from the forward process) is below 0.3, where
    the constant h = -1 scores about 1.1 and the exact h scores 0."""
    torch.manual_seed(0)
    gm = GaussianMixture.random(2, 3, seed=3)
    head = MLPHead(2, hidden=64)
    seen = []
    threads = torch.get_num_threads()
    # Ops on [256, 64] tensors: a second thread only adds sync overhead (600 steps took 66 s with
    # 2 threads on a loaded 2-core machine, 7 s with one).
    torch.set_num_threads(1)
    try:
        hist = train_head(head, gm.model(), gm.sample_x0, steps=600, batch_size=256, lr=3e-3, log_every=200,
                          callback=lambda step, loss: seen.append(step))
    finally:
        torch.set_num_threads(threads)
    assert seen == [200, 400, 600] and len(hist) == 3 and hist[-1][1] < hist[0][1]
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, 1000, (4000,), generator=g)
    _, xt, _ = gm.sample_xt(4000, t, g)
    with torch.no_grad():
        pred = head(xt.float(), t).double()
    exact = gm.h(xt, t)
    rel = float(((pred - exact) ** 2).mean() / exact.var())
    print(f"trained head: relative MSE {rel:.3f}")
    assert rel < 0.3, rel
    assert all(p.requires_grad for p in head.parameters())


def test_ocm_ddpm_beats_ddpm_at_10_and_25_steps():
    """Frechet distance to exact samples on a tight 2-d mixture (fixed seeds): OCM-DDPM with the
    exact head beats DDPM by more than 5x the distance between two exact sample sets."""
    gm = GaussianMixture.random(2, 4, seed=1)
    n = 4000
    ref = gm.sample_x0(n, torch.Generator().manual_seed(1)).float()
    spread = frechet_distance(ref, gm.sample_x0(n, torch.Generator().manual_seed(2)).float())
    for steps in (10, 25):
        kw = dict(timestep_spacing="linspace", steps=steps, seed=0)
        fd_ddpm = frechet_distance(ref, fastdiff.sample(gm.model(), (n, 2), sampler="ddpm", **kw))
        fd_ocm = frechet_distance(ref, fastdiff.sample(gm.model(return_h=True), (n, 2), sampler="ocm-ddpm", **kw))
        assert fd_ocm + 5 * spread < fd_ddpm, (steps, fd_ocm, fd_ddpm, spread)


def test_objective_and_trainer_input_errors():
    gm = GaussianMixture.random(2, 2)
    with pytest.raises(ValueError, match="probes"):
        ocm_target(gm.model(), torch.zeros(2, 2), 5, probes=0)
    with pytest.raises(ValueError, match="same shape"):
        ocm_loss(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        train_head(lambda x, t: x, gm.model(), gm.sample_x0)
    with pytest.raises(ValueError, match="t_range"):
        train_head(MLPHead(2), gm.model(), gm.sample_x0, t_range=(5, 2000))


@pytest.mark.gpu
def test_ocm_samplers_fused_on_cuda_match_reference():
    """The compiled kernel on a GPU against the torch reference path, whole 10-step chains."""
    gm = GaussianMixture.random(64, 4, seed=1)
    for cls in (OCMDDPMSampler, OCMDDIMSampler):
        a = cls(None, 10, backend="triton").sample(gm.model(return_h=True), (256, 64), seed=3, device="cuda")
        b = cls(None, 10, backend="torch").sample(gm.model(return_h=True), (256, 64), seed=3, device="cuda")
        assert a.is_cuda
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

"""Samplers: the functional API, sampler objects, determinism, batch splitting, no host sync."""
import contextlib
import math

import pytest
import torch

import fastdiff
from fastdiff import DDIMSampler, DDPMSampler, Schedule
from fastdiff.engine.kernels import philox


class LinearModel(torch.nn.Module):
    """eps(x, t) = a(t) x + b: smooth, depends on t, cheap."""

    def forward(self, x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        return x * (0.3 + t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) / 2000) + 0.05


def f64_ddim_chain(x, sampler, eta_noise=None):
    """DDIM / DDPM chain in float64 from alpha_bar, written here from docs/design.md."""
    ab = sampler.schedule.alphas_cumprod
    ts = list(sampler.timesteps)
    x = x.double()
    model = LinearModel()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_s = float(ab[t]), (float(ab[s]) if s >= 0 else 1.0)
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if isinstance(sampler, DDIMSampler):
            lam2 = sampler.eta ** 2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - lam2) * eps
            if lam2 > 0:
                x = x + math.sqrt(lam2) * eta_noise(i)
        else:
            beta = 1 - a_t / a_s
            x = math.sqrt(a_s) * beta / (1 - a_t) * x0 + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x
            if s >= 0:
                x = x + math.sqrt((1 - a_s) / (1 - a_t) * beta) * eta_noise(i)
    return x


@pytest.mark.parametrize("name,kw", [("ddim", dict(eta=0.0)), ("ddim", dict(eta=0.7)), ("ddpm", {})])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sample_matches_float64_chain(name, kw, backend):
    shape = (3, 2, 5, 3)
    s = fastdiff.make_sampler(name, "linear", 8, backend=backend, **kw)
    out = s.sample(LinearModel(), shape, seed=42)
    seed = torch.tensor([42])
    x_T = philox.randn(shape, seed, stream=philox.STREAM_INIT, backend="torch")
    g = philox.global_indices(shape, 0, "cpu")
    noise = lambda i: philox.normals_torch(seed, g, i, philox.STREAM_STEP).double()  # noqa: E731
    want = f64_ddim_chain(x_T, s, noise)
    err = float((out.double() - want).abs().max() / want.abs().max())
    assert err < 1e-4, err


def test_functional_api_and_determinism():
    a = fastdiff.sample(LinearModel(), (2, 3, 4), sampler="ddpm", steps=6, seed=1)
    b = fastdiff.sample(LinearModel(), (2, 3, 4), sampler="ddpm", steps=6, seed=1)
    c = fastdiff.sample(LinearModel(), (2, 3, 4), sampler="ddpm", steps=6, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 3, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_split_independence(backend):
    s = DDPMSampler(steps=5, backend=backend)
    whole = s.sample(LinearModel(), (5, 3, 7), seed=9)
    parts = [s.sample(LinearModel(), (2, 3, 7), seed=9, sample_offset=0),
             s.sample(LinearModel(), (3, 3, 7), seed=9, sample_offset=2)]
    assert torch.equal(torch.cat(parts), whole)


def test_backends_agree():
    kw = dict(steps=6, eta=0.4)
    a = DDIMSampler(backend="torch", **kw).sample(LinearModel(), (2, 3, 5), seed=4)
    b = DDIMSampler(backend="triton", **kw).sample(LinearModel(), (2, 3, 5), seed=4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sampling(dtype):
    s = DDIMSampler(steps=5, backend="triton")
    a = s.sample(LinearModel(), (2, 3, 5), seed=4, dtype=dtype)
    b = s.sample(LinearModel(), (2, 3, 5), seed=4, dtype=torch.float32)
    assert a.dtype == dtype
    torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_given_x_T_and_callback_and_progress(capsys):
    x_T = torch.randn(2, 4)
    seen = []
    s = DDIMSampler(steps=4)
    out = s.sample(LinearModel(), x=x_T, callback=lambda i, t, x: seen.append((i, int(t[0]))), progress=True)
    assert [i for i, _ in seen] == [0, 1, 2, 3] and [t for _, t in seen] == list(s.timesteps)
    assert not torch.equal(out, x_T) and x_T.shape == out.shape
    assert "fastdiff ddim" in capsys.readouterr().err


@contextlib.contextmanager
def forbid_host_sync():
    """Make every host-syncing tensor operation raise while the loop runs."""
    names = ["item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync inside the sampling loop: Tensor.{name}")
        return f

    for n in names:
        setattr(torch.Tensor, n, boom(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,kw", [("ddim", dict(eta=0.5)), ("ddpm", {}),
                                     ("ddim", dict(thresholding=True, prediction_type="v_prediction"))])
def test_loop_has_no_host_sync(backend, name, kw):
    s = fastdiff.make_sampler(name, None, 5, backend=backend, **kw)
    x = torch.randn(2, 3, 4)
    s.device_state(x.device)  # tables are built once, before the loop
    seed = torch.tensor([3])

    def model(x, t):
        return torch.tanh(x) * 0.5

    with forbid_host_sync():
        s.loop(model, x, seed)
    assert torch.isfinite(x).all()


def test_forbid_host_sync_detects_a_sync():
    with forbid_host_sync(), pytest.raises(AssertionError, match="host sync"):
        torch.ones(2).sum().item()


def test_thresholding_and_clipping_sampler_vs_reference_backend():
    kw = dict(steps=5, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
              prediction_type="sample")
    model = lambda x, t: 3 * torch.tanh(x)  # noqa: E731
    a = DDIMSampler(backend="torch", **kw).sample(model, (3, 8), seed=2)
    b = DDIMSampler(backend="triton", **kw).sample(model, (3, 8), seed=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = DDIMSampler(steps=5, clip_sample=True, clip_sample_range=0.5, prediction_type="sample").sample(model, (3, 8))
    assert c.abs().max() <= 0.5 + 1e-5  # final step returns the clipped x0 (ab_s = 1)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastdiff.sample(LinearModel(), (2, 3), sampler="heun"), ValueError, "unknown sampler 'heun'"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), eta=-1.0), ValueError, "eta must be a finite number >= 0"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    (lambda: fastdiff.sample(LinearModel(), (2, 0)), ValueError, "positive sizes"),
    (lambda: fastdiff.sample(LinearModel()), ValueError, "give shape"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), steps=0), ValueError, "steps must be an int >= 1"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), steps=2000), ValueError, "must not exceed num_train_timesteps"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), prediction_type="noise"), ValueError, "prediction_type must be"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), dtype=torch.float64), ValueError, "dtype must be float32"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), sampler="ddpm", variance_type="learned"), ValueError,
     "learned variances need the model's"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), schedule=Schedule(rescale_betas_zero_snr=True)), ValueError,
     "zero terminal SNR"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), x=torch.randn(2, 4)), ValueError, "does not match"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), schedule=7), TypeError, "schedule must be"),
    (lambda: fastdiff.sample(LinearModel(), (2, 3), sample_offset=-3), ValueError, r"sample_offset must be an int in \[0, 2\*\*62\)"),
])
def test_sampler_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_zero_snr_with_v_prediction_runs():
    s = DDIMSampler(Schedule("scaled_linear", beta_start=8.5e-4, beta_end=0.012, rescale_betas_zero_snr=True),
                    steps=5, prediction_type="v_prediction", timestep_spacing="trailing")
    out = s.sample(lambda x, t: 0.1 * x, (2, 4), seed=0)
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("name,kw", [("ddim", dict(eta=0.0)), ("ddim", dict(eta=1.0)), ("ddpm", {})])
def test_gpu_loop_has_no_host_sync_and_matches_cpu(name, kw):
    s = fastdiff.make_sampler(name, None, 10, **kw)
    dev = torch.device("cuda")
    s.device_state(dev)
    x = philox.randn((4, 3, 16, 16), 5, device=dev)
    x_cpu = x.cpu()
    seed = torch.tensor([5], device=dev)
    model = LinearModel()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.loop(model, x, seed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = fastdiff.make_sampler(name, None, 10, backend="torch", **kw).loop(model, x_cpu, torch.tensor([5]))
    torch.testing.assert_close(x.cpu(), ref, rtol=1e-4, atol=1e-4)

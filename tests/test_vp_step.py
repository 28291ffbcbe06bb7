"""The fused VP step kernel (through Triton's interpreter on CPU) vs its torch reference vs an
independent float64 computation of docs/design.md's formulas, written here from alpha_bar alone."""
import math
import types

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import _C
from fastdiff.engine.kernels import philox
from fastdiff.engine.step import step as vp_step
from fastdiff.engine.schedule import Schedule, next_timesteps

SCHED = Schedule("scaled_linear", beta_start=8.5e-4, beta_end=0.012)
AB = SCHED.alphas_cumprod.numpy()
TS = SCHED.timesteps(10, "trailing")
PREV = next_timesteps(TS)

# Error bound relative to max|ref|: fp32 arithmetic amplified by 1/sqrt(ab_t) (<= ~15 here),
# and for half types the final rounding (fp16 2**-11, bf16 2**-8; the interpreter truncates
# bf16 instead of rounding, so up to 2**-7).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def f64_step(x, m, i, *, kind, eta=0.0, pred="epsilon", clip=None, z=None, var="fixed_small",
             recompute=False, thresholds=None, h=None, final_ab=1.0, cov_max=1.0):
    """Float64 update x_t -> x_s from alpha_bar (docs/design.md), not from fastdiff's table."""
    x, m = x.double(), m.double()
    t, s = int(TS[i]), int(PREV[i])
    a_t = float(AB[t])
    a_s = float(AB[s]) if s >= 0 else final_ab
    sa_t, sg_t = math.sqrt(a_t), math.sqrt(1 - a_t)
    if pred == "epsilon":
        x0, eps = (x - sg_t * m) / sa_t, m
    elif pred == "v_prediction":
        x0, eps = sa_t * x - sg_t * m, sa_t * m + sg_t * x
    else:
        x0, eps = m, (x - sa_t * m) / sg_t
    if thresholds is not None:
        sb = thresholds.double().view(-1, *([1] * (x.dim() - 1)))
        x0 = torch.maximum(torch.minimum(x0, sb), -sb) / sb
    elif clip is not None:
        x0 = x0.clamp(-clip, clip)
    if recompute:
        eps = (x - sa_t * x0) / sg_t
    beta_ts = 1 - a_t / a_s
    tilde = (1 - a_s) / (1 - a_t) * beta_ts
    if kind == "ddim":
        lam2 = eta ** 2 * tilde
        mean = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - lam2, 0.0)) * eps
        base_var, c_cov = lam2, math.sqrt(a_s) - math.sqrt(max(1 - a_s - lam2, 0.0)) * sa_t / sg_t
        noisy = s >= 0
    else:
        mean = math.sqrt(a_s) * beta_ts / (1 - a_t) * x0 + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x
        noisy = s >= 0
        base_var = (tilde if var == "fixed_small" else beta_ts) if noisy else 0.0
        c_cov = math.sqrt(a_s) * beta_ts / (1 - a_t)
    if z is None:
        return mean, x0
    z = z.double()
    if h is not None:  # OCM
        sigma0 = ((1 - a_t) / a_t * (1 + h.double())).clamp(0, cov_max)
        std = torch.sqrt(base_var + c_cov ** 2 * sigma0) * (1.0 if noisy else 0.0)
        return mean + std * z, x0
    return mean + math.sqrt(base_var) * z, x0


def table_for(kind, eta=0.0, var="fixed_small", final_ab=1.0):
    if kind == "ddim":
        t = _C.ddim_table(AB, TS, PREV, eta, final_ab)
    else:
        t = _C.ddpm_table(AB, TS, PREV, var, 1.0, "last")
    return torch.from_numpy(t).float()


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype)


CASES = [
    # kind, eta, pred, clip, recompute, variance
    ("ddim", 0.0, "epsilon", None, False, "fixed_small"),
    ("ddim", 0.5, "epsilon", 1.0, False, "fixed_small"),
    ("ddim", 1.0, "v_prediction", None, False, "fixed_small"),
    ("ddim", 0.5, "sample", 0.7, True, "fixed_small"),
    ("ddim", 0.0, "epsilon", 1.5, True, "fixed_small"),
    ("ddpm", 0.0, "epsilon", None, False, "fixed_small"),
    ("ddpm", 0.0, "v_prediction", 1.0, False, "fixed_large"),
    ("ddpm", 0.0, "sample", None, False, "fixed_small"),
]


@pytest.mark.parametrize("kind,eta,pred,clip,recompute,var", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_vs_reference_vs_float64(kind, eta, pred, clip, recompute, var, dtype):
    gen = torch.Generator().manual_seed(hash((kind, eta, pred, clip, str(dtype))) % 2**31)
    shape = (3, 5, 7, 9)  # odd sizes: nothing divides the block
    table = table_for(kind, eta, var)
    for i in (0, 4, 9):  # first (t high, 1/sqrt(ab) large), middle, final step
        x = rand(shape, dtype, gen)
        m = rand(shape, dtype, gen)
        z = rand(shape, dtype, gen)
        step = torch.tensor([i], dtype=torch.int32)
        want, want_x0 = f64_step(x, m, i, kind=kind, eta=eta, pred=pred, clip=clip, z=z, var=var, recompute=recompute)
        x0_k = torch.full(shape, float("nan"), dtype=dtype)
        got = vp_step(x, m, table, step, prediction_type=pred, clip_range=clip, recompute_eps=recompute,
                      noise=z, x0_out=x0_k, backend="triton")
        ref = vp_step(x, m, table, step, prediction_type=pred, clip_range=clip, recompute_eps=recompute,
                      noise=z, backend="torch")
        assert got.dtype == dtype and got.shape == shape
        assert not torch.isnan(x0_k).any(), "x0_out was not written everywhere"
        assert rel_err(got, want) < TOL[dtype], (i, rel_err(got, want))
        assert rel_err(ref, want) < TOL[dtype], (i, rel_err(ref, want))
        assert rel_err(x0_k, want_x0) < TOL[dtype]
        if dtype == torch.float32:
            # kernel and reference do the same fp32 arithmetic: far closer than to float64
            assert rel_err(got, ref.double()) < 2e-6


def test_tolerance_can_fail():
    """A coefficient off by 0.1% is caught by the fp32 bound: the bound tests something."""
    gen = torch.Generator().manual_seed(0)
    x, m = rand((4, 33), torch.float32, gen), rand((4, 33), torch.float32, gen)
    table = table_for("ddim")
    bad = table.clone()
    bad[:, 2] *= 1.001
    step = torch.tensor([3])
    want, _ = f64_step(x, m, 3, kind="ddim")
    assert rel_err(vp_step(x, m, table, step, backend="triton"), want) < TOL[torch.float32]
    assert rel_err(vp_step(x, m, bad, step, backend="triton"), want) > TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_dtypes_and_in_place(dtype):
    gen = torch.Generator().manual_seed(5)
    x = rand((2, 3, 17), torch.float32, gen)
    m = rand((2, 3, 17), dtype, gen)  # e.g. an fp16 model on fp32 latents
    table = table_for("ddim", 0.0)
    step = torch.tensor([2])
    want, _ = f64_step(x, m, 2, kind="ddim")
    y = x.clone()
    out = vp_step(y, m, table, step, out=y, backend="triton")
    assert out.data_ptr() == y.data_ptr()
    assert rel_err(y, want) < 2e-5


def _noncontig(t, how):
    if how == "transpose":
        return t.transpose(1, 3).contiguous().transpose(1, 3)
    if how == "slice":
        big = torch.zeros(t.shape[0], t.shape[1] * 2, *t.shape[2:], dtype=t.dtype)
        big[:, ::2] = t
        return big[:, ::2]
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["transpose", "slice", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs_and_output(how, dtype):
    gen = torch.Generator().manual_seed(7)
    shape = (2, 3, 5, 6)
    x, m, z = (rand(shape, dtype, gen) for _ in range(3))
    xs, ms, zs = _noncontig(x, how), _noncontig(m, "transpose"), _noncontig(z, how)
    assert not xs.is_contiguous() and not ms.is_contiguous()
    table = table_for("ddim", 0.7)
    step = torch.tensor([5])
    want, _ = f64_step(x, m, 5, kind="ddim", eta=0.7, z=z)
    out = _noncontig(torch.zeros(shape, dtype=dtype), how)
    got = vp_step(xs, ms, table, step, noise=zs, out=out, backend="triton")
    assert got is out
    assert rel_err(out, want) < TOL[dtype]
    # in place on a non-contiguous x
    vp_step(xs, ms, table, step, noise=zs, out=xs, backend="triton")
    assert rel_err(xs, want) < TOL[dtype]


def test_expanded_and_high_rank_inputs():
    gen = torch.Generator().manual_seed(8)
    x = rand((2, 3, 4, 5, 3), torch.float32, gen)
    m_small = rand((1, 3, 4, 5, 3), torch.float32, gen)
    m = m_small.expand(2, 3, 4, 5, 3)  # stride 0 on dim 0, rank 5: the gather fallback
    table = table_for("ddpm")
    step = torch.tensor([1])
    want, _ = f64_step(x, m.contiguous(), 1, kind="ddpm")
    assert rel_err(vp_step(x, m, table, step, backend="triton"), want) < 2e-5
    m4 = rand((1, 4, 5, 3), torch.float32, gen).expand(3, 4, 5, 3)
    x4 = rand((3, 4, 5, 3), torch.float32, gen)
    want4, _ = f64_step(x4, m4.contiguous(), 1, kind="ddpm")
    assert rel_err(vp_step(x4, m4, table, step, backend="triton"), want4) < 2e-5
    x1 = rand((11,), torch.float32, gen)  # rank 1
    m1 = rand((11,), torch.float32, gen)
    want1, _ = f64_step(x1, m1, 0, kind="ddpm")
    assert rel_err(vp_step(x1, m1, table, torch.tensor([0]), backend="triton"), want1) < 2e-5


@pytest.mark.parametrize("kind,eta", [("ddim", 0.6), ("ddpm", 0.0)])
def test_in_kernel_noise_vs_float64(kind, eta):
    gen = torch.Generator().manual_seed(9)
    shape = (3, 2, 5, 7)
    x, m = rand(shape, torch.float32, gen), rand(shape, torch.float32, gen)
    table = table_for(kind, eta)
    seed = torch.tensor([20251123])
    for i, offset in ((0, 0), (3, 5)):
        step = torch.tensor([i])
        got = vp_step(x, m, table, step, seed=seed, sample_offset=offset, backend="triton")
        ref = vp_step(x, m, table, step, seed=seed, sample_offset=offset, backend="torch")
        g = philox.global_indices(shape, offset * 70, "cpu")
        z = philox.normals_torch(seed, g, i, philox.STREAM_STEP)
        want, _ = f64_step(x, m, i, kind=kind, eta=eta, z=z)
        assert rel_err(got, want) < 2e-5
        assert rel_err(ref, want) < 2e-5
        no_noise, _ = f64_step(x, m, i, kind=kind, eta=eta)
        assert (got.double() - no_noise).abs().max() > 0.01  # the noise term is really there


def test_thresholds_and_learned_variance():
    gen = torch.Generator().manual_seed(10)
    shape = (3, 4, 5)
    x, m, z = (rand(shape, torch.float32, gen) for _ in range(3))
    th = torch.tensor([1.0, 1.7, 2.5])
    table = table_for("ddpm")
    step = torch.tensor([6])
    want, _ = f64_step(x, m, 6, kind="ddpm", thresholds=th, z=z)
    assert rel_err(vp_step(x, m, table, step, thresholds=th, noise=z, backend="triton"), want) < 2e-5
    # learned_range: log-variance interpolated between beta_tilde and beta_{t|s}
    v = torch.rand(shape, generator=gen) * 2 - 1
    t, s = int(TS[6]), int(PREV[6])
    a_t, a_s = AB[t], AB[s]
    beta_ts = 1 - a_t / a_s
    tilde = (1 - a_s) / (1 - a_t) * beta_ts
    frac = (v.double() + 1) / 2
    std = torch.exp(0.5 * (frac * math.log(beta_ts) + (1 - frac) * math.log(tilde)))
    mean, _ = f64_step(x, m, 6, kind="ddpm")
    got = vp_step(x, m, table, step, var_mode="learned_range", aux=v, noise=z, backend="triton")
    assert rel_err(got, mean + std * z.double()) < 2e-5
    var = torch.rand(shape, generator=gen) * 0.01
    got = vp_step(x, m, table, step, var_mode="learned", aux=var, noise=z, backend="triton")
    assert rel_err(got, mean + var.double().sqrt() * z.double()) < 2e-5


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ocm_mode_vs_float64(kind, eta, dtype):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 3, 5, 3)
    x, m, z = (rand(shape, dtype, gen) for _ in range(3))
    h = (torch.rand(shape, generator=gen) * 1.5 - 1.2).to(dtype)  # some 1 + h < 0: clamped at 0
    table = table_for(kind, eta)
    for i in (0, 5, 9):
        step = torch.tensor([i])
        want, _ = f64_step(x, m, i, kind=kind, eta=eta, z=z, h=h)
        got = vp_step(x, m, table, step, noise=z, var_mode="ocm", aux=h, backend="triton")
        ref = vp_step(x, m, table, step, noise=z, var_mode="ocm", aux=h, backend="torch")
        assert rel_err(got, want) < TOL[dtype]
        assert rel_err(ref, want) < TOL[dtype]


def test_trajectory_10_steps_vs_float64():
    """A whole 10-step DDPM trajectory with the kernel in fp32 vs the same chain in float64."""
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 6, 5)
    W = torch.randn(shape[1], shape[1], generator=gen, dtype=torch.float64) * 0.3

    def model(x, t):  # smooth, mixes channels, depends on t
        xd = x.double()
        out = torch.einsum("ij,bjhw->bihw", W, torch.tanh(xd)) + 0.01 * t.double().view(-1, 1, 1, 1) / 1000
        return out.to(x.dtype)

    table = table_for("ddpm")
    x = torch.randn(shape, generator=gen)
    zs = [torch.randn(shape, generator=gen) for _ in range(10)]
    x64 = x.double()
    for i in range(10):
        t = torch.full((shape[0],), int(TS[i]), dtype=torch.int64)
        vp_step(x, model(x, t), table, torch.tensor([i]), noise=zs[i], out=x, backend="triton")
        x64, _ = f64_step(x64, model(x64, t), i, kind="ddpm", z=zs[i])
    assert rel_err(x, x64) < 1e-4


def test_dynamic_thresholds_values():
    from fastdiff.engine.step import StepOptions, dynamic_thresholds
    gen = torch.Generator().manual_seed(13)
    x, m = rand((3, 50), torch.float32, gen, 3.0), rand((3, 50), torch.float32, gen, 3.0)
    table = table_for("ddim")
    _, x0 = f64_step(x, m, 8, kind="ddim")
    want = torch.quantile(x0.abs(), 0.9, dim=1).clamp(1.0, 2.0)
    got = dynamic_thresholds(x, m, table, torch.tensor([8]), StepOptions(
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# --- invalid input -------------------------------------------------------------------------------

def _args():
    x = torch.randn(2, 3)
    return x, torch.randn(2, 3), table_for("ddim"), torch.tensor([0])


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: dict(model_output=torch.randn(2, 4)), ValueError, r"same shape, got \(2, 3\) and \(2, 4\)"),
    (lambda a: dict(model_output=torch.randn(2, 3).double()), ValueError, "float32, float16 or bfloat16"),
    (lambda a: dict(x=torch.ones(2, 3, dtype=torch.int32), model_output=torch.ones(2, 3, dtype=torch.int32)),
     ValueError, "float32, float16 or bfloat16"),
    (lambda a: dict(model_output=[1, 2]), TypeError, "must be a torch.Tensor"),
    (lambda a: dict(table=torch.zeros(10, 5)), ValueError, rf"\[K, {len(fastdiff.COLUMNS)}\]"),
    (lambda a: dict(step=3), ValueError, "one-element int32/int64 tensor"),
    (lambda a: dict(step=torch.tensor([0.0])), ValueError, "one-element int32/int64 tensor"),
    (lambda a: dict(kw=dict(prediction_type="x0")), ValueError, "prediction_type must be one of"),
    (lambda a: dict(kw=dict(noise=torch.randn(2, 3), seed=torch.tensor([1]))), ValueError, "not both"),
    (lambda a: dict(kw=dict(noise=torch.randn(3, 3))), ValueError, "x and noise must have the same shape"),
    (lambda a: dict(kw=dict(var_mode="ocm")), ValueError, "needs aux"),
    (lambda a: dict(kw=dict(var_mode="wide")), ValueError, "var_mode must be one of"),
    (lambda a: dict(kw=dict(thresholds=torch.ones(3))), ValueError, r"thresholds must have shape \(batch,\)"),
    (lambda a: dict(kw=dict(clip_range=0.0)), ValueError, "clip_range .*must be a finite number > 0"),
    (lambda a: dict(kw=dict(sample_offset=-1)), ValueError, r"sample_offset must be an int in \[0, 2\*\*62\)"),
    (lambda a: dict(kw=dict(out=torch.empty(3, 2))), ValueError, "x and out must have the same shape"),
    (lambda a: dict(kw=dict(backend="cuda")), ValueError, "backend must be one of"),
])
def test_invalid_step_inputs(mutate, exc, match):
    x, m, table, step = _args()
    ch = mutate(None)
    kw = ch.pop("kw", {})
    args = dict(x=x, model_output=m, table=table, step=step)
    args.update(ch)
    with pytest.raises(exc, match=match):
        vp_step(args["x"], args["model_output"], args["table"], args["step"], backend=kw.pop("backend", "triton"), **kw)


def test_backend_env_var(monkeypatch):
    x, m, table, step = _args()
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        vp_step(x, m, table, step)
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    a = vp_step(x, m, table, step)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    b = vp_step(x, m, table, step)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


def test_triton_backend_without_interpreter_on_cpu_is_explained(monkeypatch):
    from fastdiff.engine import backend
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        backend.resolve("triton", torch.device("cpu"))
    # the default for CPU tensors: the fused C++ step (the reference for other devices)
    assert backend.resolve(None, torch.device("cpu")) == "cpp"
    assert backend.resolve(None, torch.device("meta")) == "torch"
    with pytest.raises(RuntimeError, match="cpp backend .* runs CPU tensors"):
        backend.resolve("cpp", torch.device("meta"))


@pytest.mark.gpu
def test_int64_offsets_past_2_31_elements():
    """Invariant 6: a tensor of more than 2**31 elements (fp16, ~4.3 GB each)."""
    n = 2**31 + 4099
    dev = torch.device("cuda")
    x = torch.ones(n, dtype=torch.float16, device=dev)
    m = torch.full((n,), 0.5, dtype=torch.float16, device=dev)
    table = table_for("ddim").to(dev)
    step = torch.tensor([4], device=dev)
    vp_step(x, m, table, step, out=x)
    want, _ = f64_step(torch.ones(8), torch.full((8,), 0.5), 4, kind="ddim")
    tail = x[-8:].double().cpu()
    head = x[:8].double().cpu()
    assert rel_err(tail, want) < TOL[torch.float16] and rel_err(head, want) < TOL[torch.float16]
    del x, m
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernel_vs_float64(dtype):
    gen = torch.Generator().manual_seed(14)
    shape = (5, 4, 33, 31)
    table = table_for("ddim", 0.5)
    x, m, z = (rand(shape, dtype, gen) for _ in range(3))
    for i in (0, 5, 9):
        want, _ = f64_step(x, m, i, kind="ddim", eta=0.5, z=z, clip=1.0)
        got = vp_step(x.cuda(), m.cuda(), table.cuda(), torch.tensor([i], device="cuda"), noise=z.cuda(),
                      clip_range=1.0)
        # the GPU rounds bf16 to nearest: the interpreter's truncation allowance is not needed
        assert rel_err(got.cpu(), want) < (8e-3 if dtype == torch.bfloat16 else TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_from_the_model_is_not_hidden_by_clipping(backend):
    """A NaN model output must come out NaN, not as -clip_range (tl.maximum drops NaN by default)."""
    x, m = torch.randn(2, 9), torch.randn(2, 9)
    m[1, 4] = float("nan")
    table = table_for("ddim")
    for kw in (dict(clip_range=1.0), dict(thresholds=torch.tensor([1.2, 1.7])), {}):
        y = vp_step(x, m, table, torch.tensor([3]), backend=backend, **kw)
        assert torch.isnan(y[1, 4]) and int(torch.isnan(y).sum()) == 1, kw


def test_strided_table_and_thresholds_are_read_correctly():
    gen = torch.Generator().manual_seed(15)
    x, m = rand((3, 11), torch.float32, gen), rand((3, 11), torch.float32, gen)
    table = table_for("ddpm")
    wide = torch.zeros(table.shape[1], table.shape[0]).t()  # a transposed (non-contiguous) copy
    wide.copy_(table)
    th_big = torch.tensor([1.0, 0, 1.5, 0, 2.0, 0])
    want = vp_step(x, m, table, torch.tensor([2]), thresholds=th_big[::2].contiguous(), backend="torch")
    got = vp_step(x, m, wide, torch.tensor([2]), thresholds=th_big[::2], backend="triton")
    assert rel_err(got, want.double()) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_everywhere_takes_the_storage_order_path(dtype, monkeypatch):
    """All tensors channels_last: the kernel walks storage order (no index arithmetic); thresholds
    still find their sample; in-kernel noise still follows the logical index."""
    from fastdiff.engine.kernels import fused_step as mod
    gen = torch.Generator().manual_seed(16)
    shape = (3, 5, 4, 6)
    x, m, z = (rand(shape, dtype, gen) for _ in range(3))
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, m, z)]
    assert mod._dense_same_layout(cl, shape, x.numel()) and not cl[0].is_contiguous()
    assert not mod._dense_same_layout([cl[0], m], shape, x.numel())
    assert not mod._dense_same_layout([x.transpose(0, 1)], (5, 3, 4, 6), x.numel())  # dim 0 not outermost
    table = table_for("ddpm")
    th = torch.tensor([1.0, 1.3, 2.0])
    want, _ = f64_step(x, m, 4, kind="ddpm", thresholds=th, z=z)
    out = torch.empty_like(cl[0])
    got = vp_step(cl[0], cl[1], table, torch.tensor([4]), thresholds=th, noise=cl[2], out=out, backend="triton")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) < TOL[dtype]
    seed = torch.tensor([77])
    a = vp_step(cl[0], cl[1], table, torch.tensor([4]), seed=seed, backend="triton")
    b = vp_step(x, m, table, torch.tensor([4]), seed=seed, backend="triton")
    assert torch.equal(a.contiguous(), b)


def test_strided_index_math_int32_and_int64_agree(monkeypatch):
    """The strided path does its index arithmetic in int32 when every offset fits, else int64."""
    from fastdiff.engine.kernels import fused_step as mod
    gen = torch.Generator().manual_seed(17)
    x = _noncontig(rand((3, 4, 5, 7), torch.float32, gen), "transpose")
    m = _noncontig(rand((3, 4, 5, 7), torch.float32, gen), "slice")
    table = table_for("ddim", 0.5)
    seed = torch.tensor([5])
    assert mod._fits_int32([x, m], x.numel() + 64)
    assert not mod._fits_int32([x], 2**31)
    huge = types.SimpleNamespace(shape=(2, 3), stride=lambda: (2**31, 1))  # offsets past int32
    assert not mod._fits_int32([huge], 10)
    a = vp_step(x, m, table, torch.tensor([3]), seed=seed, backend="triton")
    monkeypatch.setattr(mod, "_fits_int32", lambda tensors, bound: False)
    b = vp_step(x, m, table, torch.tensor([3]), seed=seed, backend="triton")
    assert torch.equal(a, b)
    want, _ = f64_step(x.contiguous(), m.contiguous(), 3, kind="ddim", eta=0.5,
                       z=philox.normals_torch(seed, philox.global_indices(x.shape, 0, "cpu"), 3, 0))
    assert rel_err(a, want) < 2e-5

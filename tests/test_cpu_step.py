"""The C++ CPU step (fastdiff._C.cpu_step) vs an independent float64 computation and vs the Triton
kernel (through the interpreter), and its Philox noise vs the torch implementation.

Bounds, relative to max|reference|: float32 arithmetic amplified by 1/sqrt(ab_t) (<= ~15 with the
schedule below) stays under 2e-5; a float16 / bfloat16 output adds its one rounding, at most half
an ulp: 2**-11 and 2**-8 of the largest value. Each bound is checked to fail on a 0.1% (float32)
or 1% (bfloat16) error in one coefficient. Against the Triton kernel the float32 and float16
outputs are bit-identical (same float32 operations in the same order, no FMA; both round to
nearest even), bfloat16 within one ulp (the interpreter truncates bfloat16).
"""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import _C
from fastdiff.engine.kernels import philox
from fastdiff.engine.kernels.philox import cpu_randn
from fastdiff.engine.kernels.fused_step import COL, NCOL
from fastdiff.engine.schedule import Schedule, next_timesteps
from fastdiff.engine.step import step as vp_step


def cpu_step(x, model_output, table, step, *, prediction_type="epsilon", history=None, **kw):
    """The C++ step through the one step layer (backend "cpp"), in this file's older spelling."""
    if prediction_type == "flow":
        prediction_type = "flow_prediction"
    history = tuple(history or ())
    if len(history) == 2 and history[0] is None and history[1] is not None:
        hist = (torch.zeros_like(x), history[1])  # an unused first slot: H0 = zeros times c_h0
    else:
        hist = tuple(h for h in history if h is not None)
    return vp_step(x, model_output, table, step, prediction_type=prediction_type, history=hist, backend="cpp",
                   **kw)

SCHED = Schedule("scaled_linear", beta_start=8.5e-4, beta_end=0.012)
AB = SCHED.alphas_cumprod.numpy()
TS = SCHED.timesteps(10, "trailing")
PREV = next_timesteps(TS)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2.0**-11 + 2e-5, torch.bfloat16: 2.0**-8 + 2e-5}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def table_for(kind, eta=0.0, var="fixed_small", ocm=False, dtype=torch.float32):
    if kind == "ddim":
        t = _C.ddim_table(AB, TS, PREV, eta, 1.0, ocm)
    else:
        t = _C.ddpm_table(AB, TS, PREV, var, 1.0, "last", ocm)
    return torch.from_numpy(t).to(dtype)


def rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def alpha_step(x, m, i, *, kind, eta=0.0, pred="epsilon", var="fixed_small", z=None, h=None, cov_max=1.0):
    """Float64 x_t -> x_s from alpha_bar alone (docs/design.md), not from any table."""
    x, m = x.double(), m.double()
    t, s = int(TS[i]), int(PREV[i])
    a_t, a_s = float(AB[t]), (float(AB[s]) if s >= 0 else 1.0)
    sa, sg = math.sqrt(a_t), math.sqrt(1 - a_t)
    if pred == "epsilon":
        x0, eps = (x - sg * m) / sa, m
    elif pred == "v_prediction":
        x0, eps = sa * x - sg * m, sa * m + sg * x
    else:
        x0, eps = m, (x - sa * m) / sg
    beta_ts = 1 - a_t / a_s
    tilde = (1 - a_s) / (1 - a_t) * beta_ts
    noisy = s >= 0
    if kind == "ddim":
        lam2 = eta ** 2 * tilde
        mean = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - lam2, 0.0)) * eps
        var0, c_cov = lam2, math.sqrt(a_s) - math.sqrt(max(1 - a_s - lam2, 0.0)) * sa / sg
    else:
        mean = math.sqrt(a_s) * beta_ts / (1 - a_t) * x0 + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x
        var0 = (tilde if var == "fixed_small" else beta_ts) if noisy else 0.0
        c_cov = math.sqrt(a_s) * beta_ts / (1 - a_t)
    if z is None:
        return mean, x0
    if h is not None:  # OCM
        sigma0 = ((1 - a_t) / a_t * (1 + h.double())).clamp(0, cov_max)
        return mean + torch.sqrt(var0 + c_cov ** 2 * sigma0) * (1.0 if noisy else 0.0) * z.double(), x0
    return mean + math.sqrt(var0) * z.double(), x0


def row_step(x, m, row, *, pred="epsilon", clip=None, thresholds=None, recompute=False, z=None, var_mode="table",
             aux=None, cov_max=1.0, history=(None, None)):
    """Float64 update from a float64 table row by the column names (csrc/columns.h)."""
    r = {k: float(row[i]) for k, i in COL.items()}
    x, m = x.double(), m.double()
    a, b = r["a_t"], r["b_t"]
    if pred == "epsilon":
        x0, eps = (x - b * m) / a, m
    elif pred == "v_prediction":
        x0, eps = a * x - b * m, a * m + b * x
    elif pred == "sample":
        x0, eps = m, (x - a * m) / b
    else:  # flow: u = eps - x0
        x0, eps = x - b * m, x + a * m
    if thresholds is not None:
        sb = thresholds.double().view(-1, *([1] * (x.dim() - 1)))
        x0 = torch.maximum(torch.minimum(x0, sb), -sb) / sb
    elif clip is not None:
        x0 = x0.clamp(-clip, clip)
    if recompute:
        eps = (x - a * x0) / b
    xs = r["c_x0"] * x0 + r["c_eps"] * eps + r["c_xt"] * x
    for name, hist in zip(("c_h0", "c_h1"), history):
        if hist is not None:
            xs = xs + r[name] * hist.double()
    if z is not None:
        z = z.double()
        if var_mode == "table":
            xs = xs + r["std"] * z
        else:
            h = aux.double()
            if var_mode == "ocm":
                var = (r["std"] ** 2 + r["c_cov"] ** 2 * (r["cov_scale"] * (1 + h)).clamp(0, cov_max)).clamp(max=r["var_max"])
                nstd = var.sqrt()
            elif var_mode == "learned_range":
                f = (h + 1) / 2
                nstd = torch.exp(0.5 * (f * r["log_var_max"] + (1 - f) * r["log_var_min"]))
            else:
                nstd = h.sqrt()
            xs = xs + r["noise"] * nstd * z
    return xs, x0


def random_table(gen, k=4, flow=False):
    """A float64 table with every column random (history and next-input columns included)."""
    t = torch.rand(k, NCOL, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    if flow:
        t[:, COL["b_t"]] = torch.rand(k, generator=gen, dtype=torch.float64) * 0.9 + 0.05
        t[:, COL["a_t"]] = 1 - t[:, COL["b_t"]]
    t[:, COL["var_max"]] = 0.5
    t[:, COL["log_var_min"]] = -3.0
    t[:, COL["log_var_max"]] = -1.0
    t[:, COL["c_m"]] = 0.0  # the raw model-output term is not in the C++ step yet (the step layer
    # runs tables that use it on the torch reference); row_step has no such term
    return t


# --- vs float64 ------------------------------------------------------------------------------------

CASES = [  # kind, eta, pred, var
    ("ddim", 0.0, "epsilon", "fixed_small"),
    ("ddim", 0.5, "v_prediction", "fixed_small"),
    ("ddim", 1.0, "sample", "fixed_small"),
    ("ddpm", 0.0, "epsilon", "fixed_small"),
    ("ddpm", 0.0, "v_prediction", "fixed_large"),
    ("ddpm", 0.0, "sample", "fixed_small"),
]


@pytest.mark.parametrize("kind,eta,pred,var", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vs_alpha_bar_float64(kind, eta, pred, var, dtype):
    gen = torch.Generator().manual_seed(hash((kind, eta, pred, str(dtype))) % 2**31)
    shape = (3, 5, 7, 9)
    for table in (table_for(kind, eta, var), table_for(kind, eta, var, dtype=torch.float64)):
        for i in range(10):
            x, m, z = (rand(shape, dtype, gen) for _ in range(3))
            want, want_x0 = alpha_step(x, m, i, kind=kind, eta=eta, pred=pred, var=var, z=z)
            x0 = torch.full(shape, float("nan"), dtype=dtype)
            got = cpu_step(x, m, table, torch.tensor([i]), prediction_type=pred, noise=z, x0_out=x0)
            assert got.dtype == dtype and got.shape == shape
            assert rel_err(got, want) < TOL[dtype], (i, rel_err(got, want))
            assert rel_err(x0, want_x0) < TOL[dtype], i


@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ocm_vs_alpha_bar_float64(kind, eta, dtype):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 3, 5, 3)
    table = table_for(kind, eta)
    for i in range(10):
        x, m, z = (rand(shape, dtype, gen) for _ in range(3))
        h = (torch.rand(shape, generator=gen) * 1.5 - 1.2).to(dtype)  # some 1 + h < 0: clamped at 0
        want, _ = alpha_step(x, m, i, kind=kind, eta=eta, z=z, h=h)
        got = cpu_step(x, m, table, torch.tensor([i]), noise=z, var_mode="ocm", aux=h)
        assert rel_err(got, want) < TOL[dtype], i


VARIANTS = [  # every option of the update on a random table, against row_step
    dict(pred="epsilon"),
    dict(pred="v_prediction", clip=0.8),
    dict(pred="sample", recompute=True, clip=0.5),
    dict(pred="flow"),
    dict(pred="flow", clip=1.0, recompute=True),
    dict(pred="epsilon", thresholds=True, noise=True),
    dict(pred="epsilon", noise=True, history=(True, True)),
    dict(pred="flow", noise=True, history=(None, True), model_in=True),
    dict(pred="v_prediction", noise=True, var_mode="ocm", cov_max=0.7, history=(True, None)),
    dict(pred="epsilon", noise=True, var_mode="learned_range", model_in=True),
    dict(pred="sample", noise=True, var_mode="learned"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_column_vs_row_float64(variant, dtype):
    gen = torch.Generator().manual_seed(3)
    shape = (4, 3, 11)
    pred = variant["pred"]
    table = random_table(gen, flow=pred == "flow")
    x, m, z = (rand(shape, dtype, gen) for _ in range(3))
    aux = None
    if variant.get("var_mode") == "ocm":
        aux = (torch.rand(shape, generator=gen) * 2 - 1.5).to(dtype)
    elif variant.get("var_mode") == "learned_range":
        aux = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)
    elif variant.get("var_mode") == "learned":
        aux = (torch.rand(shape, generator=gen) * 0.3).to(dtype)
    hist = tuple(rand(shape, dtype, gen) if h else None for h in variant.get("history", (None, None)))
    th = torch.tensor([1.0, 1.3, 0.7, 2.0]) if variant.get("thresholds") else None
    kw = dict(prediction_type=pred, clip_range=variant.get("clip"), thresholds=th,
              recompute_eps=variant.get("recompute", False), noise=z if variant.get("noise") else None,
              var_mode=variant.get("var_mode", "table"), aux=aux, cov_max=variant.get("cov_max", 1.0),
              history=hist if any(h is not None for h in hist) else None)
    for tab in (table, table.float()):
        step = torch.tensor([2], dtype=torch.int32)
        want, want_x0 = row_step(x, m, table[2], pred=pred, clip=kw["clip_range"], thresholds=th,
                                 recompute=kw["recompute_eps"], z=kw["noise"], var_mode=kw["var_mode"], aux=aux,
                                 cov_max=kw["cov_max"], history=hist)
        x0 = torch.empty(shape, dtype=dtype)
        mi = torch.empty(shape, dtype=dtype) if variant.get("model_in") else None
        got = cpu_step(x, m, tab, step, x0_out=x0, model_in_out=mi, **kw)
        assert rel_err(got, want) < TOL[dtype]
        assert rel_err(x0, want_x0) < TOL[dtype]
        if mi is not None:
            assert rel_err(mi, float(table[2, COL["c_in"]]) * want) < TOL[dtype]


def test_flow_euler_is_the_velocity_step():
    """On the flow path (a = 1 - sigma, b = sigma), DDIM at eta = 0 is Euler on dx/dsigma = u:
    x_s = x_t + (sigma_s - sigma_t) u, written here without x0_hat or eps_hat."""
    gen = torch.Generator().manual_seed(4)
    x, u = rand((2, 3, 17), torch.float32, gen), rand((2, 3, 17), torch.float32, gen)
    sig_t, sig_s = 0.8, 0.55
    table = torch.zeros(1, NCOL, dtype=torch.float64)
    table[0, COL["a_t"]], table[0, COL["b_t"]] = 1 - sig_t, sig_t
    table[0, COL["c_x0"]], table[0, COL["c_eps"]] = 1 - sig_s, sig_s
    got = cpu_step(x, u, table, torch.tensor([0]), prediction_type="flow")
    want = x.double() + (sig_s - sig_t) * u.double()
    assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerance_can_fail(dtype):
    """One coefficient off by 0.1% (float32) or 1% (bfloat16) breaks the bound: it tests something."""
    gen = torch.Generator().manual_seed(0)
    x, m = rand((4, 33), dtype, gen), rand((4, 33), dtype, gen)
    table = table_for("ddim")
    bad = table.clone()
    bad[:, COL["c_x0"]] *= 1.001 if dtype == torch.float32 else 1.01
    want, _ = alpha_step(x, m, 3, kind="ddim")
    assert rel_err(cpu_step(x, m, table, torch.tensor([3])), want) < TOL[dtype]
    assert rel_err(cpu_step(x, m, bad, torch.tensor([3])), want) > TOL[dtype]


# --- vs the Triton kernel (interpreter) ------------------------------------------------------------

KERNEL_VARIANTS = [
    dict(),
    dict(prediction_type="v_prediction", clip_range=1.0, noise=True),
    dict(prediction_type="sample", recompute_eps=True, clip_range=0.7, noise=True),
    dict(thresholds=True, noise=True, recompute_eps=True),
    dict(noise=True, var_mode="ocm", cov_max=0.8),
    dict(prediction_type="v_prediction", noise=True, var_mode="learned"),
    dict(noise=True, var_mode="learned_range"),
]


@pytest.mark.parametrize("variant", KERNEL_VARIANTS, ids=lambda v: "-".join(sorted(v)) or "plain")
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_bits_as_the_triton_kernel(variant, dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (3, 5, 7, 9)
    kind = "ddpm" if variant.get("var_mode") in ("learned", "learned_range") else "ddim"
    table = table_for(kind, 0.6, ocm=variant.get("var_mode") == "ocm")
    x, m, z = (rand(shape, dtype, gen) for _ in range(3))
    kw = dict(variant)
    if kw.pop("noise", False):
        kw["noise"] = z
    if kw.pop("thresholds", False):
        kw["thresholds"] = torch.tensor([1.0, 1.4, 2.2])
    if kw.get("var_mode") == "ocm":
        kw["aux"] = (torch.rand(shape, generator=gen) * 2 - 1.5).to(dtype)
    elif kw.get("var_mode") == "learned_range":
        kw["aux"] = (torch.rand(shape, generator=gen) * 2 - 1).to(dtype)
    elif kw.get("var_mode") == "learned":
        kw["aux"] = (torch.rand(shape, generator=gen) * 0.02).to(dtype)
    for i in (0, 5, 9):
        step = torch.tensor([i])
        x0_c, x0_k = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        got = cpu_step(x, m, table, step, x0_out=x0_c, **kw)
        ref = vp_step(x, m, table, step, x0_out=x0_k, backend="triton", **kw)
        if dtype == torch.bfloat16:  # the interpreter truncates: one bfloat16 ulp
            assert (got.float() - ref.float()).abs().max() <= ULP[dtype] * ref.float().abs().max()
            assert (x0_c.float() - x0_k.float()).abs().max() <= ULP[dtype] * x0_k.float().abs().max()
        elif kw.get("var_mode") == "learned_range":  # libm expf vs numpy's: an ulp of the noise term
            assert rel_err(got, ref.double()) < 4 * ULP[dtype]
        else:
            assert torch.equal(got, ref), (i, (got.float() - ref.float()).abs().max())
            assert torch.equal(x0_c, x0_k)


@pytest.mark.parametrize("kind,eta", [("ddim", 0.6), ("ddpm", 0.0)])
def test_in_kernel_noise_matches_triton_and_torch(kind, eta):
    gen = torch.Generator().manual_seed(9)
    shape = (3, 2, 5, 7)
    x, m = rand(shape, torch.float32, gen), rand(shape, torch.float32, gen)
    table = table_for(kind, eta)
    seed = torch.tensor([20251123])
    for i, offset in ((0, 0), (3, 5), (6, 2**31 // 70 + 1)):
        step = torch.tensor([i])
        got = cpu_step(x, m, table, step, seed=seed, sample_offset=offset)
        ker = vp_step(x, m, table, step, seed=seed, sample_offset=offset, backend="triton")
        z = philox.normals_torch(seed, philox.global_indices(shape, offset * 70, "cpu"), i, philox.STREAM_STEP)
        with_z = cpu_step(x, m, table, step, noise=z)
        # Same 32-bit words; the normals differ by a few float32 ulp (times std <= 1).
        assert (got - with_z).abs().max() < 4e-6
        assert (got - ker).abs().max() < 4e-6
        want, _ = alpha_step(x, m, i, kind=kind, eta=eta, z=z)
        assert rel_err(got, want) < 2e-5
        no_noise, _ = alpha_step(x, m, i, kind=kind, eta=eta)
        assert (got.double() - no_noise).abs().max() > 0.01  # the noise term is really there


# --- noise -----------------------------------------------------------------------------------------

def _ulps(a, b):
    """|a - b| in float32 spacings of b, per element."""
    sp = torch.from_numpy(np.spacing(np.abs(b.float().numpy())).astype(np.float64))
    return (a.double() - b.double()).abs() / sp


def test_transform_on_every_uniform():
    """The uniform -> normal transform on all 2**23 uniforms, each as a radius and as an angle:
    within 3.5 float32 ulp of float64 (measured 3.09; torch's own log/cos/sin: 2.84)."""
    k = torch.arange(1 << 23, dtype=torch.int64) << 9
    words = torch.stack([k, k.roll(12345), k, k.roll(12345)], 1).to(torch.int32).contiguous()
    out = torch.empty(1 << 23, 4)
    _C._cpu_box_muller(words.data_ptr(), 1 << 23, out.data_ptr())
    assert torch.equal(out[:, :2], out[:, 2:])  # lanes 2, 3 run the code of lanes 0, 1
    u = ((k >> 9).double() + 0.5) * 2.0**-23
    radius = torch.sqrt(-2 * torch.log(u))
    angle = (6.283185307179586 * u.float()).double().roll(12345)  # the float32 angle, as both compute it
    for lane, trig in ((0, torch.cos), (1, torch.sin)):
        err = _ulps(out[:, lane], radius * trig(angle))
        assert float(err.max()) < 3.5, (lane, float(err.max()))
        assert float(err.mean()) < 0.6


def _each_isa():
    """Every compiled copy of the loops this CPU runs, selected in turn (then the default again)."""
    default = _C.cpu_isa()
    try:
        for isa in _C.cpu_isas():
            try:
                _C.set_cpu_isa(isa)
            except ValueError:
                continue  # compiled in but not supported by this CPU
            yield isa
    finally:
        _C.set_cpu_isa(default)


def test_randn_same_words_as_torch_and_triton():
    seed = torch.tensor(2**40 + 17)
    for isa in _each_isa():
        # 2**34 - 7: the counter g / 4 carries into its high word inside a SIMD batch
        for start, n in ((0, 1), (3, 10), (5, 4), (2**34 - 7, 37), (2**34 - 203, 1001), (11, 100003)):
            ours = cpu_randn((n,), seed, step=6, stream=0, index_offset=start)
            theirs = philox.normals_range(seed, start, n, 6, 0, "cpu")
            assert float(_ulps(ours, theirs).max()) <= 3.0, (isa, start, n)
    tri = philox.randn((3, 1001), 7, stream=philox.STREAM_STEP, backend="triton")
    ours = cpu_randn((3, 1001), 7, stream=philox.STREAM_STEP)
    assert float(_ulps(ours, tri).max()) <= 3.0
    # fp16 / bf16 outputs are the float32 normals rounded once
    for dt in (torch.float16, torch.bfloat16):
        assert torch.equal(cpu_randn((3, 1001), 7, dtype=dt), cpu_randn((3, 1001), 7).to(dt))


def test_noise_is_split_thread_and_isa_invariant():
    """A batch split across calls (with sample_offset), any thread count and any instruction-set
    copy of the loops: the same bits."""
    gen = torch.Generator().manual_seed(6)
    shape = (6, 3, 5)  # 15 elements per sample: splits land mid Philox group
    x, m = rand(shape, torch.float32, gen), rand(shape, torch.float32, gen)
    table, seed, step = table_for("ddpm"), torch.tensor([123]), torch.tensor([1])
    whole = cpu_step(x, m, table, step, seed=seed)
    for cut in (1, 2, 3, 5):
        a = cpu_step(x[:cut], m[:cut], table, step, seed=seed, sample_offset=0)
        b = cpu_step(x[cut:], m[cut:], table, step, seed=seed, sample_offset=cut)
        assert torch.equal(torch.cat([a, b]), whole), cut
    big = (8, 4, 61, 67)  # > CPU_PARALLEL_WORK, not a multiple of the chunk
    xb, mb = rand(big, torch.float32, gen), rand(big, torch.float32, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = cpu_step(xb, mb, table, step, seed=seed, sample_offset=3)
        ref_n = cpu_randn(big, 9, index_offset=5)
        for isa in _each_isa():
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                assert torch.equal(cpu_step(xb, mb, table, step, seed=seed, sample_offset=3), ref), (isa, t)
                assert torch.equal(cpu_randn(big, 9, index_offset=5), ref_n), (isa, t)
    finally:
        torch.set_num_threads(threads)


def test_isa_copies_agree_on_every_variant():
    """The baseline, AVX2 and AVX-512 loops round every operation alike (no FMA): same bits."""
    gen = torch.Generator().manual_seed(7)
    shape = (3, 7, 131)
    x = rand(shape, torch.bfloat16, gen)
    m, z, h0 = rand(shape, torch.float32, gen), rand(shape, torch.float16, gen), rand(shape, torch.float32, gen)
    aux = (torch.rand(shape, generator=gen) * 2 - 1.5).to(torch.float16)
    table = random_table(gen)
    runs = []
    for isa in _each_isa():
        outs = []
        for kw in (dict(noise=z, var_mode="ocm", aux=aux, history=(h0,), clip_range=0.9),
                   dict(prediction_type="flow", seed=torch.tensor([3]), var_mode="learned_range", aux=aux),
                   dict(prediction_type="v_prediction", thresholds=torch.tensor([1.0, 1.5, 0.8]), noise=z)):
            x0, mi = torch.empty(shape, dtype=torch.float16), torch.empty(shape)
            outs += [cpu_step(x, m, table, torch.tensor([1]), x0_out=x0, model_in_out=mi, **kw), x0, mi]
        runs.append(outs)
    assert len(runs) == len([i for i in _each_isa()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# --- dtypes, layouts, aliasing -----------------------------------------------------------------------

def test_dtype_conversions_are_exact_and_round_to_nearest_even():
    """x0_out of a 'sample' prediction is model_output itself: every float16 / bfloat16 value
    converts exactly, and float32 -> float16 / bfloat16 rounds as torch's .to() does (ties,
    subnormals, overflow to inf, NaN), in every instruction-set copy (software conversions in the
    baseline, F16C in the others)."""
    table = torch.zeros(1, NCOL, dtype=torch.float64)
    table[0, COL["a_t"]] = table[0, COL["b_t"]] = table[0, COL["c_x0"]] = 1.0
    step = torch.tensor([0])
    gen = torch.Generator().manual_seed(8)
    bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.996, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001,
                            3 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
                            3.3895314e38, float("inf"), -float("inf"), float("nan")])
    m32 = torch.cat([bits.view(torch.float32), special, torch.randn(1 << 16, generator=gen) * 1e-5])

    def same(a, b):
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())

    for isa in _each_isa():
        for src in (torch.float16, torch.bfloat16):
            m = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(src)  # all 65536 patterns
            x0 = torch.empty(m.shape)
            cpu_step(torch.zeros_like(m), m, table, step, prediction_type="sample", x0_out=x0)
            assert same(x0, m.float()), (isa, src)
        for dst in (torch.float16, torch.bfloat16):
            x0 = torch.empty(m32.shape, dtype=dst)
            cpu_step(torch.zeros_like(m32), m32, table, step, prediction_type="sample", x0_out=x0)
            assert same(x0.float(), m32.to(dst).float()), (isa, dst)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_dtypes(dtype):
    gen = torch.Generator().manual_seed(12)
    shape = (2, 3, 17)
    others = [d for d in DTYPES if d != dtype]
    x, m = rand(shape, dtype, gen), rand(shape, others[0], gen)  # e.g. an fp16 model on fp32 latents
    z, h = rand(shape, others[1], gen), rand(shape, dtype, gen)
    table = random_table(gen)
    want, want_x0 = row_step(x, m, table[1], z=z, history=(h, None))
    for out_dtype in DTYPES:
        out, x0 = torch.empty(shape, dtype=out_dtype), torch.empty(shape, dtype=others[1])
        cpu_step(x, m, table, torch.tensor([1]), noise=z, history=(h,), out=out, x0_out=x0)
        assert rel_err(out, want) < TOL[out_dtype]
        assert rel_err(x0, want_x0) < TOL[others[1]]


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
def test_non_contiguous_is_bit_identical_to_contiguous(how, dtype):
    gen = torch.Generator().manual_seed(13)
    shape = (2, 3, 5, 6)
    x, m, z, a, h = (rand(shape, dtype, gen) for _ in range(5))
    table = random_table(gen)
    step = torch.tensor([3])
    for kw in (dict(noise=z, var_mode="ocm", aux=a, history=(h, None)), dict(seed=torch.tensor([9]), thresholds=torch.tensor([1.0, 1.5]))):
        x0, mi = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        want = cpu_step(x, m, table, step, x0_out=x0, model_in_out=mi, **kw)
        nc = {k: (_noncontig(v, how) if isinstance(v, torch.Tensor) and v.shape == shape else v) for k, v in kw.items()}
        if "history" in kw:
            nc["history"] = (_noncontig(h, "slice"), None)
        xs, ms = _noncontig(x, how), _noncontig(m, "transpose")
        out, x0s, mis = (_noncontig(torch.zeros(shape, dtype=dtype), how) for _ in range(3))
        got = cpu_step(xs, ms, table, step, out=out, x0_out=x0s, model_in_out=mis, **nc)
        assert got is out
        assert torch.equal(out, want) and torch.equal(x0s, x0) and torch.equal(mis, mi)
        # in place on a non-contiguous x
        xs2 = _noncontig(x, how)
        cpu_step(xs2, ms, table, step, out=xs2, **nc)
        assert torch.equal(xs2, want)


def test_odd_shapes_ranks_and_expanded_inputs():
    gen = torch.Generator().manual_seed(14)
    table = table_for("ddim", 0.4)
    step = torch.tensor([2])
    seed = torch.tensor([5])
    for shape in [(), (1,), (11,), (1, 1, 1), (2, 1, 3, 1, 5), (2, 3, 4, 5, 3, 2), (1023,), (3, 517)]:
        x, m = rand(shape, torch.float32, gen), rand(shape, torch.float32, gen)
        n = x.numel()
        z = philox.normals_range(seed, 0, n, 2, 0, "cpu").view(shape)
        want, _ = alpha_step(x, m, 2, kind="ddim", eta=0.4, z=z)
        got = cpu_step(x, m, table, step, seed=seed)
        assert got.shape == shape and rel_err(got, want) < 2e-5, shape
    x = rand((2, 3, 4, 5, 3), torch.float32, gen)
    m = rand((1, 3, 4, 5, 3), torch.float32, gen).expand(2, 3, 4, 5, 3)  # stride 0 on dim 0
    want, _ = alpha_step(x, m.contiguous(), 2, kind="ddim")
    assert rel_err(cpu_step(x, m, table_for("ddim"), step), want) < 2e-5
    assert cpu_step(torch.empty(0, 3), torch.empty(0, 3), table, step).shape == (0, 3)


def test_in_place_and_aliasing():
    gen = torch.Generator().manual_seed(15)
    shape = (3, 4, 33)
    x, m, z = (rand(shape, torch.float32, gen) for _ in range(3))
    table = random_table(gen)
    step = torch.tensor([0])
    x0 = torch.empty(shape)
    want = cpu_step(x, m, table, step, noise=z, x0_out=x0)
    y = x.clone()
    assert cpu_step(y, m, table, step, noise=z, out=y).data_ptr() == y.data_ptr()
    assert torch.equal(y, want)
    mm = m.clone()
    cpu_step(x, mm, table, step, noise=z, x0_out=mm)  # x0_hat written over the model output
    assert torch.equal(mm, x0)
    zz = z.clone()
    cpu_step(x, m, table, step, noise=zz, out=zz)
    assert torch.equal(zz, want)
    big = rand((3, 4, 34), torch.float32, gen)
    # the step layer refuses these before the C++ step sees them (the C++ checks stay as a backstop)
    with pytest.raises(ValueError, match="out shares memory with x without being it"):
        cpu_step(big[..., :-1], m, table, step, out=big[..., 1:])
    with pytest.raises(ValueError, match="must be different tensors"):
        o = torch.empty(shape)
        cpu_step(x, m, table, step, out=o, x0_out=o)
    with pytest.raises(ValueError, match="overlapping memory"):
        cpu_step(x, m, table, step, out=torch.empty(1, 4, 33).expand(shape))


def test_nan_from_the_model_is_not_hidden_by_clipping():
    x, m = torch.randn(2, 9), torch.randn(2, 9)
    m[1, 4] = float("nan")
    table = table_for("ddim")
    for kw in (dict(clip_range=1.0), dict(thresholds=torch.tensor([1.2, 1.7])), {}):
        y = cpu_step(x, m, table, torch.tensor([3]), **kw)
        assert torch.isnan(y[1, 4]) and int(torch.isnan(y).sum()) == 1, kw


def test_strided_table_and_thresholds():
    gen = torch.Generator().manual_seed(16)
    x, m = rand((3, 11), torch.float32, gen), rand((3, 11), torch.float32, gen)
    table = table_for("ddpm")
    wide = torch.zeros(table.shape[1], table.shape[0], dtype=torch.float64).t()  # transposed, float64
    wide.copy_(table)
    th_big = torch.tensor([1.0, 0, 1.5, 0, 2.0, 0])
    want = cpu_step(x, m, table, torch.tensor([2]), thresholds=th_big[::2].contiguous())
    got = cpu_step(x, m, wide, torch.tensor([2]), thresholds=th_big[::2])
    assert torch.equal(got, want)
    assert torch.equal(cpu_step(x, m, table.half(), torch.tensor([2])), cpu_step(x, m, table.half().float(), torch.tensor([2])))


# --- invalid input ---------------------------------------------------------------------------------

def _args():
    return torch.randn(2, 3), torch.randn(2, 3), table_for("ddim"), torch.tensor([0])


@pytest.mark.parametrize("change,exc,match", [
    (dict(model_output=torch.randn(2, 4)), ValueError, r"same shape, got \(2, 3\) and \(2, 4\)"),
    (dict(model_output=torch.randn(2, 3).double()), ValueError, "float32, float16 or bfloat16"),
    (dict(x=torch.ones(2, 3, dtype=torch.int32)), ValueError, "float32, float16 or bfloat16"),
    (dict(x=torch.ones(2, 3, device="meta"), model_output=torch.ones(2, 3, device="meta")), ValueError,
     "table must be on x's device meta"),
    (dict(x=[1, 2]), TypeError, "must be a torch.Tensor"),
    (dict(model_output=[1, 2]), TypeError, "must be a torch.Tensor"),
    (dict(table=torch.zeros(10, 5)), ValueError, rf"\[K, {NCOL}\]"),
    (dict(step=3), ValueError, "one-element int32/int64 tensor"),
    (dict(step=torch.tensor([0.0])), ValueError, "one-element int32/int64 tensor"),
    (dict(prediction_type="x0"), ValueError, "prediction_type must be one of"),
    (dict(noise=torch.randn(2, 3), seed=torch.tensor([1])), ValueError, "not both"),
    (dict(noise=torch.randn(3, 3)), ValueError, "x and noise must have the same shape"),
    (dict(seed=torch.tensor([1.5])), ValueError, "seed must be a one-element"),
    (dict(var_mode="ocm"), ValueError, "needs aux"),
    (dict(var_mode="wide"), ValueError, "var_mode must be one of"),
    (dict(thresholds=torch.ones(3)), ValueError, r"thresholds must have shape \(batch,\)"),
    (dict(clip_range=0.0), ValueError, "clip_range .* must be a finite number > 0"),
    (dict(clip_range=float("nan")), ValueError, "clip_range .* must be a finite number > 0"),
    (dict(sample_offset=-1), ValueError, r"sample_offset must be an int in \[0, 2\*\*62\)"),
    (dict(out=torch.empty(3, 2)), ValueError, "x and out must have the same shape"),
    (dict(model_in_out=torch.empty(2, 3, dtype=torch.float64)), ValueError, "model_in_out must be float32"),
    (dict(history=[torch.randn(2, 3)] * 5), ValueError, "at most 4 tensors"),
    (dict(history=(None, torch.randn(2, 4))), ValueError, r"x and history\[1\] must have the same shape"),
])
def test_invalid_inputs_are_named(change, exc, match):
    x, m, table, step = _args()
    args = dict(x=x, model_output=m, table=table, step=step)
    kw = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(exc, match=match):
        cpu_step(args["x"], args["model_output"], args["table"], args["step"], **kw)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_an_index_outside_the_table_reads_the_nearest_row(backend):
    x, m, table, _ = _args()
    assert torch.equal(cpu_step(x, m, table, torch.tensor([10])) if backend == "cpp" else
                       vp_step(x, m, table, torch.tensor([10]), backend="torch"),
                       vp_step(x, m, table, torch.tensor([9]), backend="torch") if backend == "torch" else
                       cpu_step(x, m, table, torch.tensor([9])))
    assert torch.equal(cpu_step(x, m, table, torch.tensor([-1])), cpu_step(x, m, table, torch.tensor([0])))


def test_no_torch_headers_in_the_cpu_step_sources():
    from pathlib import Path
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    for name in ("cpu_step.cpp", "cpu_step_kernel.h", "philox.h"):
        src = (csrc / name).read_text()
        assert "torch/" not in src and "ATen" not in src and "c10/" not in src, name


def test_randn_errors_and_isa_names():
    with pytest.raises(ValueError, match="index_offset must be >= 0"):
        cpu_randn((3,), 1, index_offset=-2)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        cpu_randn((3,), 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="is not available here"):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() in _C.cpu_isas() and _C.cpu_isas()[0] == "baseline"
    # a seed past int64 keys Philox by its low 64 bits, as the int64 seed tensor -1 does
    assert torch.equal(cpu_randn((9,), 2**64 - 1), cpu_randn((9,), torch.tensor(-1)))

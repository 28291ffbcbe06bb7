"""Classifier-free guidance in the one step: the model output is m = u + w (c - u), optionally
rescaled per sample (Lin et al., 2023; diffusers' rescale_noise_cfg), before anything reads it.

* The fused step (Triton through the interpreter, the C++ step, the torch reference) against
  float64 written out here: the combination, diffusers' rescale formula, then the update of
  tests/test_engine.py's float64 (every prediction type, c_m included) and the noise of every
  variance mode; odd shapes, every dtype, views of the doubled batch, transposed halves.
* Bad input raises a ValueError naming the constraint on every backend.

Bounds are tests/test_engine.py's, relative to max|reference|: float32 arithmetic 2e-5, a float16 /
bfloat16 output its one rounding; each case also checks that the same bound refuses the result
without the rescale (or without guidance), so that the bound can fail.
"""
import math

import pytest
import torch

import fastdiff
from fastdiff import StepOptions, step
from test_engine import COL, DTYPES, TOL, f64_general, random_table, rel_err

BACKENDS = ("triton", "torch", "cpp")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")
VAR_MODES = ("table", "ocm", "learned_range", "learned")
W = 4.0  # the guidance scale of the step tests


def f64_guided(u, c, w, rescale):
    """m = u + w (c - u), then diffusers' rescale_noise_cfg in float64, written as diffusers does."""
    u, c = u.double(), c.double()
    m = u + w * (c - u)
    if rescale:
        dims = list(range(1, m.dim()))
        std_text = c.std(dim=dims, keepdim=True)
        std_cfg = m.std(dim=dims, keepdim=True)
        m = rescale * (m * (std_text / std_cfg)) + (1 - rescale) * m
    return m


def f64_noise_std(row, var_mode, aux, cov_max):
    """The per-element noise scale of each variance mode in float64 (docs/design.md)."""
    r = {k: float(row[i]) for k, i in COL.items()}
    if var_mode == "table":
        return r["std"]
    a = aux.double()
    if var_mode == "ocm":
        sigma0 = (r["cov_scale"] * (1 + a)).clamp(0, cov_max)
        return r["noise"] * (r["std"] ** 2 + r["c_cov"] ** 2 * sigma0).clamp(max=r["var_max"]).sqrt()
    if var_mode == "learned_range":
        frac = (a + 1) / 2
        return r["noise"] * torch.exp(0.5 * (frac * r["log_var_max"] + (1 - frac) * r["log_var_min"]))
    return r["noise"] * a.sqrt()


def guidance_table(gen, flow):
    """test_engine's random rows plus the variance modes' columns."""
    t = random_table(3, gen, flow=flow)
    for name, lo, hi in (("c_cov", -0.8, 0.8), ("cov_scale", 0.2, 3.0), ("log_var_min", -5.0, -3.0),
                         ("log_var_max", -2.5, -1.0), ("var_max", 0.4, 0.9), ("noise", 1.0, 1.0)):
        t[:, COL[name]] = torch.rand(3, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return t


def doubled(shape, dtype, gen, layout="chunks"):
    """(u, c): the two halves of a model's doubled output [2B, ...], as views. The conditional
    half differs in scale and offset from the unconditional one, so that std(c)/std(m) is far
    from 1 and the rescale shows. "transposed": halves of a transposed [2B] tensor; "mixed": u a
    contiguous half, c a transposed tensor of its own."""
    b = shape[0]
    if layout == "chunks":
        out = torch.randn((2 * b,) + shape[1:], generator=gen)
    else:
        out = torch.randn((2 * b,) + shape[1:][::-1], generator=gen).permute(0, *range(len(shape) - 1, 0, -1))
    out[b:] = out[b:] * 1.7 + 0.3
    out = out.to(dtype)
    u, c = out[:b], out[b:]
    if layout == "mixed":
        u = u.contiguous()
        assert not c.is_contiguous()
    return u, c


@pytest.mark.parametrize("var_mode", VAR_MODES)
@pytest.mark.parametrize("pred", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_guided_step_against_float64(dtype, pred, var_mode):
    gen = torch.Generator().manual_seed(3 + len(pred) + 7 * VAR_MODES.index(var_mode))
    table = guidance_table(gen, flow=pred == "flow_prediction")
    shape = (3, 5, 7)
    x, z = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    u, c = doubled(shape, dtype, gen)
    aux = None
    if var_mode != "table":
        aux = torch.rand(shape, generator=gen) * (2.0 if var_mode == "learned_range" else 1.5)
        aux = (aux - 1.0 if var_mode != "learned" else aux + 0.05).to(dtype)
    hist = [torch.randn(shape, generator=gen).to(dtype)]
    w = torch.tensor([W])
    for rescale in (0.0, 0.7):
        m = f64_guided(u, c, W, rescale)
        xs, x0, _, eps, _ = f64_general(x, m, hist, None, table[1], pred)
        want = xs + f64_noise_std(table[1], var_mode, aux, 1.0) * z.double()
        unscaled_x0 = f64_general(x, f64_guided(u, c, W, 0.0), hist, None, table[1], pred)[1]
        for backend in BACKENDS:
            out, x0_out, eps_out = (torch.empty_like(x) for _ in range(3))
            got = step(x, u, table.float(), torch.tensor([1]), prediction_type=pred, var_mode=var_mode, aux=aux,
                       noise=z, history=hist, guidance=True, guidance_rescale=rescale, guidance_cond=c,
                       guidance_scale=w, out=out, x0_out=x0_out, eps_out=eps_out, backend=backend)
            assert got is out
            err = rel_err(out, want)
            assert err < TOL[dtype], (backend, rescale, err)
            assert rel_err(x0_out, x0) < TOL[dtype] and rel_err(eps_out, eps) < TOL[dtype], backend
            if rescale:
                assert rel_err(x0_out, unscaled_x0) > 10 * TOL[dtype], backend  # the bound sees the rescale


@pytest.mark.parametrize("layout", ["chunks", "transposed", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guided_step_on_strided_halves_in_place_with_outputs(layout, dtype):
    gen = torch.Generator().manual_seed(17)
    table = random_table(2, gen)
    shape = (4, 3, 6)
    u, c = doubled(shape, dtype, gen, layout)
    x = torch.randn(shape[::-1], generator=gen).permute(2, 1, 0).to(dtype)  # non-contiguous state
    hist = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2)]
    w = torch.tensor([-1.5])  # a negative scale is a scale too
    m = f64_guided(u, c, -1.5, 0.4)
    want, _, want_in, _, want_xc = f64_general(x, m, hist, None, table[0], "v_prediction")
    for backend in BACKENDS:
        xb, mi, xc = x.clone(), torch.empty_like(x), torch.empty(shape, dtype=dtype)
        step(xb, u, table.float(), torch.tensor([0]), prediction_type="v_prediction", history=hist, guidance=True,
             guidance_rescale=0.4, guidance_cond=c, guidance_scale=w, out=xb, model_in_out=mi, xc_out=xc,
             backend=backend)
        for got, ref in ((xb, want), (mi, want_in), (xc, want_xc)):
            assert rel_err(got, ref) < TOL[dtype], (backend, layout)


def test_guided_step_of_rank_5_strided_tensors():
    """Rank above 4 and not contiguous: the Triton launcher runs on contiguous copies."""
    gen = torch.Generator().manual_seed(4)
    table = random_table(2, gen)
    shape = (2, 3, 2, 3, 5)
    u, c = doubled(shape, torch.float32, gen, "transposed")
    x = torch.randn(shape, generator=gen)
    want = f64_general(x, f64_guided(u, c, 2.5, 1.0), [], None, table[1], "epsilon")[0]
    for backend in BACKENDS:
        got = step(x, u, table.float(), torch.tensor([1]), guidance=True, guidance_rescale=1.0, guidance_cond=c,
                   guidance_scale=torch.tensor([2.5]), backend=backend)
        assert rel_err(got, want) < 2e-5, backend


@pytest.mark.parametrize("kind", ["clip+recompute_eps", "thresholding"])
def test_clamps_and_thresholds_read_the_guided_output(kind):
    """Dynamic thresholding's per-sample quantile is of x0_hat of the guided (and rescaled) m."""
    gen = torch.Generator().manual_seed(9)
    table = random_table(2, gen)
    shape = (3, 4, 5)
    x = torch.randn(shape, generator=gen)
    u, c = doubled(shape, torch.float32, gen)
    row = {k: float(table[0, i]) for k, i in COL.items()}
    opts = dict(clip_range=1.5, recompute_eps=True) if kind != "thresholding" else dict(
        thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=50.0)

    def f64(m):
        xd = x.double()
        x0, eps = (xd - row["b_t"] * m) / row["a_t"], m
        if kind == "thresholding":
            s = torch.quantile(x0.reshape(3, -1).abs(), 0.8, dim=1).clamp(1, 50).reshape(3, 1, 1)
            assert (s > 1).all()  # the quantile itself, not the clamp, sets s
            x0 = torch.minimum(torch.maximum(x0, -s), s) / s
        else:
            x0 = x0.clamp(-1.5, 1.5)
            eps = (xd - row["a_t"] * x0) / row["b_t"]
        return row["c_x0"] * x0 + row["c_eps"] * eps + row["c_xt"] * xd + row["c_m"] * m

    want, unscaled = f64(f64_guided(u, c, 2.0, 0.6)), f64(f64_guided(u, c, 2.0, 0.0))
    for backend in BACKENDS:
        got = step(x, u, table.float(), torch.tensor([0]), guidance=True, guidance_rescale=0.6, guidance_cond=c,
                   guidance_scale=torch.tensor([2.0]), backend=backend, **opts)
        assert rel_err(got, want) < 2e-5, backend
        assert rel_err(got, unscaled) > 2e-4, backend


def test_float64_guided_step_computes_in_float64():
    gen = torch.Generator().manual_seed(6)
    table = random_table(2, gen)
    x = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    u, c = doubled((2, 9), torch.float64, gen)
    want = f64_general(x, f64_guided(u, c, 3.0, 0.5), [], None, table[1], "epsilon")[0]
    for backend in BACKENDS:
        got = step(x, u, table, torch.tensor([1]), guidance=True, guidance_rescale=0.5, guidance_cond=c,
                   guidance_scale=torch.tensor([3.0], dtype=torch.float64), backend=backend)
        assert got.dtype == torch.float64 and rel_err(got, want) < 1e-13, backend


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,match", [
    (dict(guidance_cond=torch.randn(3, 4, 6)), r"model_output \(the unconditional output\) and guidance_cond "
                                               r"\(the conditional one\) must have the same shape"),
    (dict(guidance_scale=7.5), "guidance_scale must be a one-element floating-point tensor"),
    (dict(guidance_scale=torch.tensor([7.5, 1.0])), "guidance_scale must be a one-element"),
    (dict(guidance_scale=torch.tensor([7])), "floating-point tensor"),
    (dict(guidance_scale=torch.tensor([7.5], device="meta")), "guidance_scale must be on x's device cpu"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be a finite number in \[0, 1\], got 1.5"),
    (dict(guidance_rescale=-0.1), r"guidance_rescale must be a finite number in \[0, 1\]"),
    (dict(guidance_rescale=math.nan), r"guidance_rescale must be a finite number in \[0, 1\]"),
    (dict(guidance=False, guidance_rescale=0.5, guidance_cond=None, guidance_scale=None), "needs guidance=True"),
    (dict(guidance_cond=None), "guidance=True needs guidance_cond"),
    (dict(guidance=False), "options.guidance is False"),
    (dict(guidance_cond=torch.randint(0, 3, (3, 4, 5))), "guidance_cond must be float32, float16 or bfloat16"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_guidance_input_is_refused(change, match, backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=gen)
    u, c = doubled((3, 4, 5), torch.float32, gen)
    kw = dict(guidance=True, guidance_cond=c, guidance_scale=torch.tensor([7.5]))
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        step(x, u, random_table(2, gen).float(), torch.tensor([0]), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescale_needs_two_elements_per_sample(backend):
    x, u, c = torch.randn(3, 1), torch.randn(3, 1), torch.randn(3, 1)
    with pytest.raises(ValueError, match="at least 2 elements per sample"):
        step(x, u, random_table(2, torch.Generator()).float(), torch.tensor([0]), guidance=True,
             guidance_rescale=0.5, guidance_cond=c, guidance_scale=torch.tensor([2.0]), backend=backend)
    # without the rescale one element per sample is fine
    step(x, u, random_table(2, torch.Generator()).float(), torch.tensor([0]), guidance=True, guidance_cond=c,
         guidance_scale=torch.tensor([2.0]), backend=backend)

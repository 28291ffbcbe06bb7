"""The engine's one step beyond the VP families: the column list, history slots, the next model
input, flow_prediction, row clamping, output checks; the Table and StepOptions objects; sampler
immutability and registration. Kernel (Triton interpreter) and reference against float64."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import StepOptions, Table, step
from fastdiff.engine.kernels import fused_step

ROOT = Path(__file__).resolve().parents[1]
COL = {name: i for i, name in enumerate(fastdiff.COLUMNS)}
NCOL = len(fastdiff.COLUMNS)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_column_list_is_the_header_list():
    names = re.findall(r'X\(\w+, "(\w+)"\)', (ROOT / "csrc" / "columns.h").read_text())
    assert tuple(names) == fastdiff.COLUMNS
    # the kernel's column constexprs are read from the same names
    kernel_cols = {k[4:].lower(): v.value for k, v in vars(fused_step).items() if k.startswith("COL_")}
    assert len(kernel_cols) >= 15 and all(COL[name] == i for name, i in kernel_cols.items())


def random_table(rows, gen, flow=False):
    """Random coefficients in the ranges solvers produce (a, b > 0; history weights of both signs)."""
    t = torch.zeros(rows, NCOL, dtype=torch.float64)
    a = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.8 + 0.15
    t[:, COL["a_t"]] = a
    t[:, COL["b_t"]] = 1 - a if flow else (1 - a * a).sqrt()
    for name, lo, hi in (("c_x0", 0.1, 1.0), ("c_eps", -0.5, 0.9), ("c_xt", -0.3, 0.8), ("c_m", -0.5, 0.5),
                         ("c_h0", -0.7, 0.7), ("c_h1", -0.4, 0.4), ("c_h2", -0.5, 0.3), ("c_h3", -0.2, 0.6),
                         ("std", 0.0, 0.6), ("c_in", 0.3, 1.0), ("xc_xt", -0.2, 1.0), ("xc_x0", -0.6, 0.7),
                         ("xc_eps", -0.4, 0.5), ("xc_h0", -0.5, 0.5), ("xc_h1", -0.3, 0.4), ("xc_h2", -0.6, 0.2),
                         ("xc_h3", 0.1, 0.9)):
        t[:, COL[name]] = torch.rand(rows, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return t


def f64_general(x, m, hist, z, row, pred):
    """(x_s, x0_hat, c_in x_s, eps_hat, x_c) from one table row in float64, written from the formulas of
    docs/design.md (hist: the history tensors H0.., any number up to four)."""
    x, m = x.double(), m.double()
    r = {k: float(row[i]) for k, i in COL.items()}
    a, b = r["a_t"], r["b_t"]
    if pred == "epsilon":
        x0, eps = (x - b * m) / a, m
    elif pred == "v_prediction":
        x0, eps = a * x - b * m, a * m + b * x
    elif pred == "sample":
        x0, eps = m, (x - a * m) / b
    else:  # flow: u = eps - x0 with a + b = 1
        x0, eps = x - b * m, x + a * m
    xs = r["c_x0"] * x0 + r["c_eps"] * eps + r["c_xt"] * x + r["c_m"] * m
    xc = r["xc_xt"] * x + r["xc_x0"] * x0 + r["xc_eps"] * eps
    for k, h in enumerate(hist):
        xs = xs + r[f"c_h{k}"] * h.double()
        xc = xc + r[f"xc_h{k}"] * h.double()
    if z is not None:
        xs = xs + r["std"] * z.double()
    return xs, x0, r["c_in"] * xs, eps, xc


def rel_err(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample", "flow_prediction"])
@pytest.mark.parametrize("n_hist", [0, 1, 2, 3, 4])
def test_general_row_with_history_and_next_input(dtype, pred, n_hist):
    gen = torch.Generator().manual_seed(7 + n_hist)
    table = random_table(4, gen, flow=pred == "flow_prediction")
    shape = (3, 5, 7)
    x, m, z = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    hist = [torch.randn(shape, generator=gen).to(dtype) for _ in range(n_hist)]
    idx = torch.tensor([2])
    want, want_x0, want_in, want_eps, want_xc = f64_general(x, m, hist, z, table[2], pred)
    for backend in ("triton", "torch", "cpp"):
        out, x0_out, mi = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        # the corrected sample and eps_hat on every other history count (both ways are served)
        more = dict(xc_out=torch.empty_like(x), eps_out=torch.empty_like(x)) if n_hist % 2 == 0 else {}
        got = step(x, m, table.float(), idx, prediction_type=pred, noise=z, history=hist, out=out, x0_out=x0_out,
                   model_in_out=mi, backend=backend, **more)
        assert got is out
        assert rel_err(out, want) < TOL[dtype], backend
        assert rel_err(x0_out, want_x0) < TOL[dtype], backend
        assert rel_err(mi, want_in) < TOL[dtype], backend
        if more:
            assert rel_err(more["xc_out"], want_xc) < TOL[dtype], backend
            assert rel_err(more["eps_out"], want_eps) < TOL[dtype], backend


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp"])
def test_corrected_sample_alone_in_place_and_strided(backend):
    """x_c without x0_out (the loops must still form x0_hat), written over the history tensor it
    reads (in place is allowed: element i is read before it is written), on transposed inputs."""
    gen = torch.Generator().manual_seed(11)
    table = random_table(3, gen)
    x = torch.randn(4, 6, 5, generator=gen).transpose(1, 2)
    m = torch.randn(4, 5, 6, generator=gen)
    hist = [torch.randn(4, 5, 6, generator=gen) for _ in range(3)] + [torch.randn(4, 6, 5, generator=gen).transpose(1, 2)]
    want, _, _, _, want_xc = f64_general(x, m, hist, None, table[0], "epsilon")
    h3 = hist[3].clone()
    out = torch.empty(4, 5, 6)
    step(x, m, table.float(), torch.tensor([0]), history=hist[:3] + [h3], out=out, xc_out=h3, backend=backend)
    assert rel_err(out, want) < 2e-5 and rel_err(h3, want_xc) < 2e-5


def test_history_and_next_input_strided_and_in_place():
    gen = torch.Generator().manual_seed(3)
    table = random_table(2, gen)
    base = torch.randn(4, 6, 5, generator=gen)
    x = base.transpose(1, 2)  # non-contiguous inputs and outputs
    m, h0 = torch.randn(4, 5, 6, generator=gen), torch.randn(6, 5, 4, generator=gen).permute(2, 1, 0)
    want, _, want_in, _, _ = f64_general(x, m, [h0], None, table[1], "v_prediction")
    mi = torch.empty(4, 6, 5).transpose(1, 2)
    for backend in ("triton", "torch", "cpp"):
        xb = x.clone()
        step(xb, m, table.float(), torch.tensor([1]), prediction_type="v_prediction", history=[h0], out=xb,
             model_in_out=mi, backend=backend)
        assert rel_err(xb, want) < 2e-5 and rel_err(mi, want_in) < 2e-5, backend


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp"])
def test_out_of_range_row_reads_the_nearest_row(backend):
    gen = torch.Generator().manual_seed(5)
    table = random_table(3, gen).float()
    x, m = torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)
    first = step(x, m, table, torch.tensor([0]), backend=backend)
    last = step(x, m, table, torch.tensor([2]), backend=backend)
    assert torch.equal(step(x, m, table, torch.tensor([-4]), backend=backend), first)
    assert torch.equal(step(x, m, table, torch.tensor([99], dtype=torch.int32), backend=backend), last)
    # with dynamic thresholding too (its per-sample quantile reads the same nearest row)
    thr = dict(prediction_type="sample", thresholding=True, sample_max_value=1.5)
    assert torch.equal(step(x, m, table, torch.tensor([99]), backend=backend, **thr),
                       step(x, m, table, torch.tensor([2]), backend=backend, **thr))


@pytest.mark.parametrize("kw,match", [
    (dict(out=torch.zeros(1, 1, 1).expand(2, 3, 4)), "overlapping memory"),
    (dict(x0_out="out"), "must be different tensors"),
    (dict(model_in_out="out"), "must be different tensors"),
    (dict(history=[torch.randn(2, 3, 4)] * 5), "at most 4"),
    (dict(history=[torch.randn(2, 3, 5)]), "same shape"),
    (dict(table=torch.zeros(4, NCOL, dtype=torch.int64)), "floating-point"),
    (dict(options=StepOptions(), prediction_type="sample"), "not both"),
    (dict(sample_offset=1.5), r"sample_offset must be an int in \[0, 2\*\*62\)"),
    (dict(sample_offset=2**61), "below 2\\*\\*62"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_outputs_and_options_are_rejected(kw, match, backend):
    gen = torch.Generator().manual_seed(1)
    x, m = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    kw = dict(kw)
    table = kw.pop("table", random_table(2, gen).float())
    out = torch.empty_like(x)
    for k in ("x0_out", "model_in_out"):
        if kw.get(k) == "out":
            kw[k] = out
            kw["out"] = out
    with pytest.raises((ValueError, TypeError), match=match):
        step(x, m, table, torch.tensor([0]), backend=backend, **kw)


def test_float64_inputs_compute_in_float64_on_every_backend():
    gen = torch.Generator().manual_seed(2)
    table = Table(random_table(3, gen))
    x, m, z = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    want, _, _, _, _ = f64_general(x, m, [], z, table.host[1], "epsilon")
    for backend in ("triton", "torch"):
        got = step(x, m, table, torch.tensor([1]), noise=z, backend=backend)
        assert got.dtype == torch.float64 and rel_err(got, want) < 1e-14
    with pytest.raises(ValueError, match="every tensor must be float64"):
        step(x, m.float(), table, torch.tensor([1]))


def test_step_options_validate_once_and_hash():
    a = StepOptions(prediction_type="v_prediction", clip_range=1)
    assert a == StepOptions(prediction_type="v_prediction", clip_range=1.0) and hash(a) == hash(
        StepOptions(prediction_type="v_prediction", clip_range=1.0))
    assert isinstance(a.clip_range, float)
    with pytest.raises(Exception):
        a.clip_range = 2.0  # frozen
    for bad, match in ((dict(prediction_type="x0"), "prediction_type"), (dict(clip_range=-1), "clip_range"),
                       (dict(clip_range=float("nan")), "clip_range"), (dict(var_mode="wide"), "var_mode"),
                       (dict(thresholding=True, dynamic_thresholding_ratio=0.0), "ratio"),
                       (dict(thresholding=True, sample_max_value=0.5), "sample_max_value"),
                       (dict(cov_max=0), "cov_max"), (dict(recompute_eps=1), "bool")):
        with pytest.raises(ValueError, match=match):
            StepOptions(**bad)


def test_table_is_read_only_keyed_by_value_and_bounded():
    gen = torch.Generator().manual_seed(4)
    host = random_table(3, gen).numpy()
    t = Table(host, rows="timestep")
    with pytest.raises(ValueError):
        t.host[0, 0] = 1.0
    host[0, 0] = 5.0  # the Table copied its input
    assert t.host[0, 0] != 5.0
    assert t.key == Table(t.host).key != Table(host).key
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float32):
        assert t.on("cpu", dtype).dtype == dtype
    assert len(t._copies) <= 4 and t.on("cpu") is t.on("cpu")
    for bad in (np.zeros((3, NCOL - 1)), np.zeros((0, NCOL)), np.zeros(NCOL)):
        with pytest.raises(ValueError, match="coefficient table"):
            Table(bad)
    with pytest.raises(ValueError, match="rows must be one of"):
        Table(host, rows="sample")


def test_samplers_are_immutable():
    s = fastdiff.DDIMSampler(steps=4, eta=0.3)
    for name, value in (("eta", 0.0), ("steps", 8), ("timesteps", np.arange(4)), ("options", StepOptions())):
        with pytest.raises(AttributeError, match="cannot change after construction"):
            setattr(s, name, value)
    with pytest.raises(ValueError):
        s.timesteps[0] = 3  # read-only array
    o = fastdiff.OCMDDIMSampler(steps=3, head=lambda x, t: x * 0)  # a subclass of a subclass finishes its init
    assert o.options.var_mode == "ocm" and o.uses_noise
    with pytest.raises(AttributeError):
        o.head = None


def test_the_model_cannot_change_the_timesteps():
    s = fastdiff.DDPMSampler(steps=5)
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        t.add_(1)  # a model that edits its input in place
        return 0.1 * x

    a = s.sample(model, (2, 3), seed=1)
    first = list(seen)
    seen.clear()
    b = s.sample(model, (2, 3), seed=1)
    assert seen == first == list(s.timesteps) and torch.equal(a, b)


def test_register_sampler_decorator_reads_the_name():
    @fastdiff.register_sampler
    class Half(fastdiff.DDIMSampler):
        name = "test-half-ddim"

    try:
        assert fastdiff.SAMPLERS["test-half-ddim"] is Half
        assert isinstance(fastdiff.make_sampler("test-half-ddim", steps=3), Half)
    finally:
        del fastdiff.SAMPLERS["test-half-ddim"]
    with pytest.raises(ValueError, match="class attribute name"):
        fastdiff.register_sampler(type("NoName", (fastdiff.DDIMSampler,), {}))
    with pytest.raises(TypeError, match="Sampler subclass"):
        fastdiff.register_sampler(int)


def test_every_built_in_sampler_is_known_after_import_fastdiff():
    code = "import fastdiff, sys; print(sorted(fastdiff.SAMPLERS)); print('fastdiff.diffusers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names, dropins = res.stdout.split("\n")[:2]
    assert eval(names) == ["consistency", "ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "euler", "euler-a", "flow-ddim",
                           "flow-dpmpp-2m", "flow-dpmpp-2m-sde", "flow-euler", "flow-stochastic", "flow-unipc", "ocm-ddim", "ocm-ddpm",
                           "ocm-flow", "unipc"]
    assert dropins == "False"  # import fastdiff does not pull diffusers in


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp"])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
def test_out_in_place_on_the_model_output_with_x0_and_eps_out(backend, pred):
    """out = model_output (an exact alias, allowed) with x0_out and eps_out: eps_hat (epsilon) or
    x0_hat (sample) is the model output itself, and must be kept before out overwrites it."""
    gen = torch.Generator().manual_seed(13)
    table = random_table(2, gen)
    x, m = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    want, want_x0, _, want_eps, _ = f64_general(x, m, [], None, table[1], pred)
    mm, x0, eps = m.clone(), torch.empty_like(x), torch.empty_like(x)
    step(x, mm, table.float(), torch.tensor([1]), prediction_type=pred, out=mm, x0_out=x0, eps_out=eps,
         backend=backend)
    assert rel_err(mm, want) < 2e-5 and rel_err(x0, want_x0) < 2e-5 and rel_err(eps, want_eps) < 2e-5

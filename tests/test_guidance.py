"""Classifier-free guidance in the one step: the model output is m = u + w (c - u), optionally
rescaled per sample (Lin et al., 2023; diffusers' rescale_noise_cfg), before anything reads it.

* The fused step (Triton through the interpreter, the C++ step, the torch reference) against
  float64 written out here: the combination, diffusers' rescale formula, then the update of
  tests/test_engine.py's float64 (every prediction type, c_m included) and the noise of every
  variance mode; odd shapes, every dtype, views of the doubled batch, transposed halves.
* The native samplers' guided loop against the same loop done by hand (the model output combined
  in torch, then the unguided sampler), with no host read in the loop.
* The graph key holds whether guidance is on and its rescale, not the scale; a new scale replays
  the same graph (a stand-in for the CUDA graph, as tests/test_graphs.py).
* Bad input raises a ValueError naming the constraint on every backend.

Bounds are tests/test_engine.py's, relative to max|reference|: float32 arithmetic 2e-5, a float16 /
bfloat16 output its one rounding; each case also checks that the same bound refuses the result
without the rescale (or without guidance), so that the bound can fail.
"""
import math
import warnings

import pytest
import torch

import fastdiff
from fastdiff import StepOptions, step
from fastdiff.graphs import GraphCache, GraphedSampler, GraphFallbackWarning
from test_engine import COL, DTYPES, TOL, f64_general, random_table, rel_err
from test_graphs import fake_graphs  # noqa: F401  (a fixture)

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


# -- the native samplers ---------------------------------------------------------------------------

def cond_model(x, t):
    """A model that knows its conditioning: on the doubled batch, the first half unconditional
    (embedding 0), the second conditional (embedding 1); t must be [2B] with equal halves."""
    b = x.shape[0] // 2
    assert x.shape[0] == 2 * b and t.shape == (2 * b,) and torch.equal(t[:b], t[b:])
    assert torch.equal(x[:b], x[b:])
    emb = torch.cat([torch.zeros(b), torch.ones(b)]).reshape((-1,) + (1,) * (x.dim() - 1))
    tt, xf = t.float().reshape(emb.shape) / 1000, x.float()
    # about proportional to x (so that the samples stay O(1) over a few steps) and never constant
    # over a sample (a rescale divides by the std of the guided output)
    return ((0.8 + 0.3 * emb) * xf + 0.3 * torch.sin(1.5 * xf + emb - tt)).to(x.dtype)


def combined(model, w, rescale):
    """The hand-made guided model: the doubled call, the halves combined in torch (float32) and
    rescaled by diffusers' rescale_noise_cfg, for an unguided sampler."""
    def run(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]))
        u, c = out.float().chunk(2)
        m = u + w * (c - u)
        if rescale:
            dims = list(range(1, m.dim()))
            std_text, std_cfg = c.std(dim=dims, keepdim=True), m.std(dim=dims, keepdim=True)
            m = rescale * (m * (std_text / std_cfg)) + (1 - rescale) * m
        return m
    return run


SAMPLERS = [("ddim", dict(eta=0.4)), ("dpmpp-2m", {}), ("euler", {}), ("flow-euler", {}), ("unipc", dict(solver_order=3)),
            ("flow-unipc", dict(schedule=dict(shift=5.0)))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_guided_loop_equals_the_loop_by_hand(name, kw, backend):
    shape, steps = (2, 3, 5), 4
    for dtype in ((torch.float32, torch.bfloat16) if backend == "cpp" else (torch.float32,)):
        opts = dict(sampler=name, steps=steps, seed=5, dtype=dtype, backend=backend, **kw)
        got = {r: fastdiff.sample(cond_model, shape, guidance_scale=W, guidance_rescale=r, **opts) for r in (0, 0.7)}
        # the same float32 operations in the same order: the step forms u + w (c - u) as torch does
        assert torch.equal(got[0], fastdiff.sample(combined(cond_model, W, 0.0), shape, **opts)), dtype
        # f m in place of diffusers' phi m std(c)/std(m) + (1 - phi) m: a few float32 roundings a
        # step apart, grown by the chain (x0_hat divides by sqrt(ab) ~ 0.07 at t = 999)
        want = fastdiff.sample(combined(cond_model, W, 0.7), shape, **opts).double()
        bound = 1e-4 if dtype == torch.float32 else 1.6e-2
        assert rel_err(got[0.7], want) < bound and rel_err(got[0], want) > 10 * bound, dtype
        assert got[0].dtype == dtype
        assert not torch.equal(got[0], fastdiff.sample(combined(cond_model, 0.0, 0.0), shape, **opts))


def test_guided_ocm_reads_the_conditional_half_of_the_head():
    def head(x, t):
        return 0.3 * torch.tanh(x) - 0.4 + 0.05 * torch.arange(x.shape[0]).reshape(-1, 1, 1)

    def head_by_hand(x, t):  # the head on the doubled batch, conditional half
        return head(torch.cat([x, x]), torch.cat([t, t]))[x.shape[0]:]

    got = fastdiff.sample(cond_model, (3, 2, 4), sampler="ocm-ddim", steps=4, head=head, guidance_scale=3.0, seed=2)
    want = fastdiff.sample(combined(cond_model, 3.0, 0.0), (3, 2, 4), sampler="ocm-ddim", steps=4,
                           head=head_by_hand, seed=2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_no_host_read_in_the_guided_loop(request, backend):
    s = fastdiff.DDIMSampler(steps=5, eta=0.5, thresholding=True, sample_max_value=2.0, guidance_scale=5.0,
                             guidance_rescale=0.7, backend=backend)
    x = torch.randn(2, 3, 4)
    seed, scale = torch.tensor([1]), torch.tensor([5.0])
    s.device_state(x.device)  # the table's device copy, made before the loop
    reads = request.getfixturevalue("host_reads")
    s.loop(cond_model, x, seed, guidance_scale=scale)
    assert reads.stop() == []
    assert torch.isfinite(x).all()


def test_per_call_scale_and_callback():
    s = fastdiff.EulerSampler(steps=4, guidance_scale=7.5)
    seen = []
    a = s.sample(cond_model, (2, 4), seed=1, guidance_scale=2.0, callback=lambda i, t, x: seen.append((t.shape, x.shape)))
    assert torch.equal(a, fastdiff.EulerSampler(steps=4, guidance_scale=2.0).sample(cond_model, (2, 4), seed=1))
    assert not torch.equal(a, s.sample(cond_model, (2, 4), seed=1))
    assert seen == [(torch.Size([2]), torch.Size([2, 4]))] * 4  # the callback sees the batch, not its double


# -- CUDA graphs: the key and the replay -------------------------------------------------------------

def test_graph_key_holds_guidance_and_rescale_not_the_scale():
    cache = GraphCache()

    def key(**kw):
        return cache.key(fastdiff.DDIMSampler(steps=4, **kw), cond_model, (2, 3), torch.float32, "cpu")

    assert key(guidance_scale=7.5) == key(guidance_scale=2.0) == key(guidance_scale=-1.0)
    assert key(guidance_scale=7.5) != key()
    assert key(guidance_scale=7.5, guidance_rescale=0.7) != key(guidance_scale=7.5)
    assert key(guidance_scale=7.5, guidance_rescale=0.7) == key(guidance_scale=1.0, guidance_rescale=0.7)


def test_a_new_scale_replays_without_recapture(fake_graphs):  # noqa: F811
    s = fastdiff.DDIMSampler(steps=4, eta=0.3, guidance_scale=7.5, guidance_rescale=0.5)
    runner = GraphedSampler(s, cond_model, pool="pool")
    a = runner((2, 3, 4), seed=1)
    runner.guidance_scale = 3.0
    assert runner.guidance_scale == 3.0
    b = runner((2, 3, 4), seed=1)
    c = runner((2, 3, 4), seed=1, guidance_scale=7.5)
    runner.guidance_scale = None
    d = runner((2, 3, 4), seed=1)
    assert runner.captures == 1 and fake_graphs[0].replays == 4
    assert torch.equal(a, s.sample(cond_model, (2, 3, 4), seed=1))
    assert torch.equal(b, s.sample(cond_model, (2, 3, 4), seed=1, guidance_scale=3.0))
    assert torch.equal(a, c) and torch.equal(a, d) and not torch.equal(a, b)


def test_functional_cuda_graph_with_new_scales_captures_once(fake_graphs, monkeypatch):  # noqa: F811
    cache = GraphCache(pool="pool")
    monkeypatch.setattr(fastdiff.graphs, "_DEFAULT", cache)
    kw = dict(sampler="dpmpp-2m", steps=4, seed=3)
    runs = {w: fastdiff.sample(cond_model, (2, 5), cuda_graph=True, guidance_scale=w, **kw) for w in (7.5, 2.0)}
    assert cache.captures == 1
    for w, got in runs.items():
        assert torch.equal(got, fastdiff.sample(cond_model, (2, 5), guidance_scale=w, **kw))


def test_cpu_fallback_of_a_guided_runner_equals_eager():
    s = fastdiff.FlowEulerSampler(steps=4, guidance_scale=4.0)
    runner = GraphedSampler(s, cond_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphFallbackWarning)
        got = runner((2, 6), seed=2, guidance_scale=1.5)
    assert torch.equal(got, s.sample(cond_model, (2, 6), seed=2, guidance_scale=1.5))


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


@pytest.mark.parametrize("call,match", [
    (lambda: fastdiff.sample(cond_model, (2, 3), steps=3, guidance_scale="7.5"),
     r"guidance_scale \(None for no guidance\) must be a finite number"),
    (lambda: fastdiff.sample(cond_model, (2, 3), steps=3, guidance_scale=7.5, guidance_rescale=2.0),
     r"guidance_rescale must be a finite number in \[0, 1\]"),
    (lambda: fastdiff.sample(cond_model, (2, 3), steps=3, guidance_rescale=0.5), "needs guidance_scale"),
    (lambda: fastdiff.sample(lambda x, t: x[: x.shape[0] // 2], (2, 3), steps=3, guidance_scale=7.5),
     r"doubled batch \(4 samples: x twice\) and its output must have 4 samples, the unconditional half first"),
    (lambda: fastdiff.DDIMSampler(steps=3).sample(cond_model, (2, 3), guidance_scale=7.5),
     "for a sampler made without guidance"),
    (lambda: fastdiff.DDIMSampler(steps=3, guidance_scale=7.5).sample(cond_model, (2, 3), guidance_scale=math.inf),
     "guidance_scale must be a finite number"),
    (lambda: setattr(GraphedSampler("ddim", cond_model, steps=3), "guidance_scale", 2.0),
     "for a sampler made without guidance"),
])
def test_bad_sampler_guidance_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- GPU: the compiled kernel and a real CUDA graph (skipped without CUDA) --------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_guided_step_against_float64(dtype):
    gen = torch.Generator().manual_seed(21)
    table = guidance_table(gen, flow=False)
    shape = (3, 4, 33, 17)
    x = torch.randn(shape, generator=gen).to(dtype)
    for layout in ("chunks", "transposed"):
        u, c = doubled(shape, dtype, gen, layout)
        for rescale in (0.0, 0.7):
            want = f64_general(x, f64_guided(u, c, W, rescale), [], None, table[1], "v_prediction")[0]
            got = step(x.cuda(), u.cuda(), table.float().cuda(), torch.tensor([1], device="cuda"),
                       prediction_type="v_prediction", guidance=True, guidance_rescale=rescale, guidance_cond=c.cuda(),
                       guidance_scale=torch.tensor([W], device="cuda"), backend="triton")
            assert rel_err(got.cpu(), want) < TOL[dtype], (layout, rescale)


@pytest.mark.gpu
def test_gpu_graphed_guided_loop_takes_a_new_scale_without_recapture():
    from test_graphs import TinyUNetish

    torch.manual_seed(0)
    net = TinyUNetish().cuda().eval()

    def model(x, t):  # the conditioning, known to the model: the second half shifted
        out = net(x, t)
        b = x.shape[0] // 2
        return torch.cat([out[:b], out[b:] + 0.1])

    s = fastdiff.DDIMSampler(steps=8, eta=0.3, guidance_scale=7.5, guidance_rescale=0.7)
    shape = (2, 3, 16, 16)
    with GraphedSampler(s, model) as runner, torch.no_grad():
        for w in (7.5, 2.0, 7.5):
            runner.guidance_scale = w
            graphed = runner(shape, seed=1, device="cuda")
            assert torch.equal(graphed, s.sample(model, shape, seed=1, device="cuda", guidance_scale=w)), w
        assert runner.captures == 1

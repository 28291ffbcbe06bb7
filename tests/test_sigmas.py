"""fastdiff.engine.sigmas against diffusers 0.42.1's own schedulers, bit for bit.

Each case builds the diffusers scheduler, calls its set_timesteps, and requires our float64 arrays,
cast to float32, to equal ``scheduler.sigmas`` / ``scheduler.timesteps`` bit for bit (int64
timesteps exactly). Where we raise ValueError on a config diffusers accepts, diffusers' own result
must be broken (NaN, inf or a NaN cast to int64): see ``check``. Grids cover every option; 200
seeded random configs cover the space between them.
"""
import itertools
import logging
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")

from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

from fastdiff.engine import sigmas as S  # noqa: E402


def _pipeline_function(module, name):
    """A pure function of a diffusers pipeline module, from its source: importing the module needs
    transformers, which the test environment need not have."""
    import ast
    import pathlib
    path = pathlib.Path(diffusers.__file__).parent / "pipelines" / module
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


flux_calculate_shift = _pipeline_function("flux/pipeline_flux.py", "calculate_shift")

logging.getLogger("diffusers").setLevel(logging.ERROR)  # "timesteps passed without sigmas" notes
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")  # diffusers' np.array(tensor)

INT_MIN = np.iinfo(np.int64).min
BETAS = {
    "sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
}
KINDS = {None: {}, "karras": dict(use_karras_sigmas=True), "exponential": dict(use_exponential_sigmas=True),
         "beta": dict(use_beta_sigmas=True)}


def first_diff(a, b):
    i = int(np.flatnonzero(~((a == b) | (np.isnan(a) & np.isnan(b))))[0])
    return f"first at [{i}]: diffusers {a[i]!r}, ours {b[i]!r}"


def ulps(a32, b32):
    """Distance in float32 units in the last place (same-sign finite values)."""
    return np.abs(a32.view(np.int32).astype(np.int64) - b32.view(np.int32).astype(np.int64))


def assert_same(ref, ours, what, tie=None):
    """ours (float64, or int64) cast to float32 equals ref bit for bit. ``tie``: the one index where
    a difference is allowed, the median of a beta schedule (see test_beta_median_tie): 1 ulp of the
    median, which is 2 ulps of 1 - median after invert_sigmas (a smaller binade) and of the timestep
    N sigma. Returns whether it was bit for bit."""
    ref = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape}, diffusers {ref.shape}"
    if ref.dtype == np.int64:
        assert ours.dtype == np.int64, f"{what}: dtype {ours.dtype}"
        assert np.array_equal(ours, ref), f"{what} differ, {first_diff(ref, ours)}"
        return True
    assert ref.dtype == np.float32 and ours.dtype == np.float64, f"{what}: dtypes {ref.dtype}, {ours.dtype}"
    o32 = ours.astype(np.float32)
    same = o32.view(np.uint32) == ref.view(np.uint32)
    if same.all():
        return True
    assert tie is not None and np.flatnonzero(~same).tolist() == [tie], f"{what} differ, {first_diff(ref, o32)}"
    assert ulps(o32[tie:tie + 1], ref[tie:tie + 1])[0] <= 2, f"{what}[{tie}]: {ref[tie]!r} vs ours {o32[tie]!r}"
    return False


def broken(sched):
    s = sched.sigmas.numpy()
    t = sched.timesteps.numpy()
    return (not np.isfinite(s).all()) or (t == INT_MIN).any() or (t.dtype != np.int64 and not np.isfinite(t).all())


def check(make, set_timesteps, ours, tie=None):
    """diffusers' (make(), set_timesteps(sched)) against ours() -> (sigmas, timesteps)."""
    sched = make()
    try:
        set_timesteps(sched)
    except (ValueError, TypeError, AssertionError, IndexError) as exc:
        with pytest.raises(ValueError):
            ours()
        return f"both raise ({type(exc).__name__})"
    try:
        s, t = ours()
    except ValueError as exc:
        assert broken(sched), f"we raise {exc!r} where diffusers gives finite values"
        return "diffusers broken, we raise"
    exact = assert_same(sched.sigmas, s, "sigmas", tie)
    exact &= assert_same(sched.timesteps, t, "timesteps", tie)
    return "equal" if exact else "equal but the beta median"


def median_tie(cfg, n):
    """The index of ppf(0.5) in a beta schedule of odd length n (see test_beta_median_tie)."""
    return n // 2 if cfg.get("use_beta_sigmas") and n % 2 == 1 else None


EQUAL = ("equal", "equal but the beta median")


# --- flow matching ----------------------------------------------------------------------------

def flow_case(n, lists, mu=None, N=1000, **cfg):
    sig = np.linspace(1.0, 1.0 / n, n) if lists in ("sigmas", "both") else None
    ts = np.linspace(N, N / 100, n) if lists in ("timesteps", "both") else None
    steps = n if lists == "none" else None
    return check(lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, **cfg),
                 lambda s: s.set_timesteps(steps, sigmas=sig, mu=mu, timesteps=ts),
                 lambda: S.flow_sigmas(steps, num_train_timesteps=N, mu=mu, sigmas=sig, timesteps=ts, **cfg),
                 median_tie(cfg, n))


@pytest.mark.parametrize("lists", ["none", "sigmas", "timesteps", "both"])
@pytest.mark.parametrize("shifting", ["static", "exponential", "linear"])
def test_flow_grid(shifting, lists):
    dyn = shifting != "static"
    outcomes = set()
    for shift, term, kind, inv, n in itertools.product([1.0, 1.7, 3.0], [None, 0.1], KINDS, [False, True], [1, 9]):
        cfg = dict(shift=shift, use_dynamic_shifting=dyn, time_shift_type="linear" if shifting == "linear" else
                   "exponential", shift_terminal=term, invert_sigmas=inv, **KINDS[kind])
        outcomes.add(flow_case(n, lists, mu=0.9 if dyn else None, **cfg))
    assert outcomes & set(EQUAL)


@pytest.mark.parametrize("n", [4, 28, 50])
def test_flow_pipelines(n):
    """As the pipelines drive it: SD3 (shift 3), Flux (sigmas linspace(1, 1/n) and mu from the
    image sequence length), LTX (shift_terminal), Mochi (invert_sigmas)."""
    assert flow_case(n, "none", shift=3.0) in EQUAL
    mu = flux_calculate_shift(4096, 256, 4096, 0.5, 1.15)
    assert flow_case(n, "sigmas", mu=mu, use_dynamic_shifting=True) in EQUAL
    assert flow_case(n, "sigmas", mu=2.05, use_dynamic_shifting=True, shift_terminal=0.1) in EQUAL
    assert flow_case(n, "none", invert_sigmas=True) in EQUAL


@pytest.mark.parametrize("N", [1000, 1, 77])
@pytest.mark.parametrize("shift,dyn", [(1.0, False), (3.0, False), (1.7, False), (0.31, False), (3.0, True)])
def test_flow_train_sigmas(N, shift, dyn):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift, use_dynamic_shifting=dyn)
    s, t = S.flow_train_sigmas(N, shift, dyn)
    assert_same(sched.sigmas, s, "sigmas")
    assert_same(sched.timesteps, t, "timesteps")
    assert (s[0], s[-1]) == (sched.sigma_max, sched.sigma_min)


def test_flow_set_shift():
    """set_shift changes the shift set_timesteps applies, not the init-time sigma_min / sigma_max."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_shift(1.7)
    sched.set_timesteps(12)
    s0, _ = S.flow_train_sigmas(1000, 3.0, False)
    s, t = S.flow_sigmas(12, shift=1.7, sigma_min=s0[-1], sigma_max=s0[0])
    assert_same(sched.sigmas, s, "sigmas")
    assert_same(sched.timesteps, t, "timesteps")


@pytest.mark.parametrize("seq", [256, 1000, 4096, 6000, 1.5])
def test_calculate_shift(seq):
    assert S.calculate_shift(seq) == flux_calculate_shift(seq)
    assert S.calculate_shift(seq, 256, 8192, 0.3, 2.1) == flux_calculate_shift(seq, 256, 8192, 0.3, 2.1)


def test_index_for_timestep_and_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(timesteps=[900.0, 900.0, 500.0, 20.5], sigmas=[0.9, 0.8, 0.5, 0.1])
    _, t = S.flow_sigmas(timesteps=[900.0, 900.0, 500.0, 20.5], sigmas=[0.9, 0.8, 0.5, 0.1], shift=3.0)
    for ts in [900.0, 500.0, 20.5]:
        assert S.index_for_timestep(t, ts) == sched.index_for_timestep(torch.tensor(ts))
    sched.set_timesteps(10)
    s, t = S.flow_sigmas(10, shift=3.0)
    x0, noise = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    ts = sched.timesteps[3:5]
    ref = sched.scale_noise(x0, ts, noise)
    sigma = torch.tensor([s[S.index_for_timestep(t, float(v))] for v in ts], dtype=torch.float32)[:, None, None]
    assert torch.equal(ref, sigma * noise + (1.0 - sigma) * x0)


# --- sigma space: Euler, Euler ancestral --------------------------------------------------------

def euler_case(betas, n=None, timesteps=None, sigmas=None, N=1000, **cfg):
    return check(lambda: EulerDiscreteScheduler(num_train_timesteps=N, **BETAS[betas], **cfg),
                 lambda s: s.set_timesteps(n, timesteps=timesteps, sigmas=sigmas),
                 lambda: S.euler_sigmas(_ab(EulerDiscreteScheduler, N, betas), n, timesteps=timesteps, sigmas=sigmas,
                                        **cfg), median_tie(cfg, n or 0))


_AB = {}


def _ab(cls, N, betas):
    """diffusers' float32 alphas_cumprod (what a drop-in holds), built once per schedule."""
    key = (cls.__name__, N, betas)
    if key not in _AB:
        _AB[key] = cls(num_train_timesteps=N, **BETAS[betas]).alphas_cumprod
    return _AB[key]


@pytest.mark.parametrize("betas", list(BETAS))
def test_euler_spacing_grid(betas):
    for spacing, offset, interp, final, n in itertools.product(
            ["linspace", "leading", "trailing"], [0, 1], ["linear", "log_linear"], ["zero", "sigma_min"],
            [1, 7, 31, 61]):  # 61: trailing's arange has n + 1 values; >= 31: torch's vectorised exp
        assert euler_case(betas, n, timestep_spacing=spacing, steps_offset=offset, interpolation_type=interp,
                          final_sigmas_type=final) in EQUAL


@pytest.mark.parametrize("kind", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("betas", ["sd", "linear", "cosine", "zero_snr"])
def test_euler_converted_grid(betas, kind):
    for spacing, interp, final, n, ends in itertools.product(
            ["linspace", "leading", "trailing"], ["linear", "log_linear"], ["zero", "sigma_min"], [1, 7, 20],
            [(None, None), (0.1, 10.0)]):
        assert euler_case(betas, n, timestep_spacing=spacing, interpolation_type=interp, final_sigmas_type=final,
                          sigma_min=ends[0], sigma_max=ends[1], **KINDS[kind]) in EQUAL


@pytest.mark.parametrize("betas", ["sd", "zero_snr"])
def test_euler_lists_and_continuous(betas):
    lists = [dict(timesteps=[999, 800.5, 500, 250, 3]), dict(sigmas=[14.6, 7.1, 3.3, 1.0, 0.2, 0.05, 0.0]),
             dict(sigmas=[5.0, 1.0, 0.03]), dict(n=12)]
    for given, interp, (tt, pred) in itertools.product(lists, ["linear", "log_linear"],
                                                       [("discrete", "epsilon"), ("continuous", "v_prediction"),
                                                        ("continuous", "epsilon")]):
        assert euler_case(betas, **given, interpolation_type=interp, timestep_type=tt,
                          prediction_type=pred) in EQUAL + ("both raise (ValueError)",)
    for kind in ["karras", "beta"]:  # continuous timesteps of converted sigmas
        assert euler_case(betas, 9, timestep_type="continuous", prediction_type="v_prediction",
                          **KINDS[kind]) in EQUAL


@pytest.mark.parametrize("betas", list(BETAS))
def test_euler_ancestral_and_init_noise_sigma(betas):
    ab = _ab(EulerAncestralDiscreteScheduler, 1000, betas)
    for spacing, offset, n in itertools.product(["linspace", "leading", "trailing"], [0, 1], [1, 7, 30, 61]):
        sched = EulerAncestralDiscreteScheduler(**BETAS[betas], timestep_spacing=spacing, steps_offset=offset)
        sched.set_timesteps(n)
        s, t = S.euler_ancestral_sigmas(ab, n, timestep_spacing=spacing, steps_offset=offset)
        assert_same(sched.sigmas, s, "sigmas")
        assert_same(sched.timesteps, t, "timesteps")
        assert S.euler_init_noise_sigma(sched.sigmas, spacing) == float(sched.init_noise_sigma)
        exact = s.max() if spacing != "leading" else math.sqrt(s.max() ** 2 + 1)
        assert abs(S.euler_init_noise_sigma(s, spacing) - exact) <= 1e-15 * exact


# --- VP multistep: DPM-Solver, UniPC -------------------------------------------------------------

def dpm_case(betas, n=None, timesteps=None, mu=None, **cfg):
    return check(lambda: DPMSolverMultistepScheduler(**BETAS[betas], **cfg),
                 lambda s: s.set_timesteps(n, timesteps=timesteps, mu=mu),
                 lambda: S.dpm_sigmas(_ab(DPMSolverMultistepScheduler, 1000, betas), n, timesteps=timesteps, mu=mu,
                                      beta_schedule=BETAS[betas]["beta_schedule"], **cfg), median_tie(cfg, n or 0))


SPACING_OFFSETS = [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)]
DPM_KINDS = dict(KINDS, lu=dict(use_lu_lambdas=True), flow=dict(use_flow_sigmas=True))


@pytest.mark.parametrize("kind", list(DPM_KINDS))
@pytest.mark.parametrize("betas", list(BETAS))
def test_dpm_grid(betas, kind):
    for (spacing, offset), clip, final, n in itertools.product(SPACING_OFFSETS, [-math.inf, -5.1],
                                                               ["zero", "sigma_min"], [1, 9, 61]):
        assert dpm_case(betas, n, timestep_spacing=spacing, steps_offset=offset, lambda_min_clipped=clip,
                        final_sigmas_type=final, **DPM_KINDS[kind]) in EQUAL


@pytest.mark.parametrize("betas", ["sd", "cosine"])
def test_dpm_flow_shift_mu_and_lists(betas):
    for shift, n in itertools.product([1.0, 3.0, 5.0, 0.7], [1, 8, 30]):
        assert dpm_case(betas, n, use_flow_sigmas=True, flow_shift=shift) in EQUAL
    for mu, n in itertools.product([0.7, 1.1, -0.3, 2.3], [8, 30]):
        assert dpm_case(betas, n, mu=mu, use_flow_sigmas=True, use_dynamic_shifting=True) in EQUAL
    for ts in ([999, 800, 500, 250, 3], [999, 999, 10], [5]):
        for final in ["zero", "sigma_min"]:
            assert dpm_case(betas, timesteps=ts, final_sigmas_type=final) in EQUAL


def unipc_case(betas, n, sigmas=None, mu=None, **cfg):
    return check(lambda: UniPCMultistepScheduler(**BETAS[betas], **cfg),
                 lambda s: s.set_timesteps(n, sigmas=sigmas, mu=mu),
                 lambda: S.unipc_sigmas(_ab(UniPCMultistepScheduler, 1000, betas), n, sigmas=sigmas, mu=mu, **cfg),
                 median_tie(cfg, n))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("betas", ["sd", "linear", "cosine"])
def test_unipc_grid(betas, kind):
    for (spacing, offset), flow, final, n, ends in itertools.product(
            SPACING_OFFSETS, [False, True], ["zero", "sigma_min"], [1, 7, 20], [(None, None), (0.2, 12.0)]):
        if ends[0] is not None and kind is None:
            continue
        assert unipc_case(betas, n, timestep_spacing=spacing, steps_offset=offset, use_flow_sigmas=flow,
                          final_sigmas_type=final, sigma_min=ends[0], sigma_max=ends[1], **KINDS[kind]) in EQUAL


@pytest.mark.parametrize("kind", list(KINDS))
def test_unipc_flow(kind):
    """Wan's configuration (flow sigmas, flow_shift) and its variants: dynamic shifting, terminal
    stretch, a sigmas list."""
    outcomes = set()
    for shift, shifting, term, lists, final, n in itertools.product(
            [1.0, 3.0, 5.0], ["static", "exponential", "linear"], [None, 0.1], [False, True], ["zero", "sigma_min"],
            [1, 10]):
        dyn = shifting != "static"
        outcomes.add(unipc_case("sd", n, sigmas=np.linspace(1.0, 1.0 / n, n) if lists else None,
                                mu=0.8 if dyn else None, use_flow_sigmas=True, flow_shift=shift,
                                use_dynamic_shifting=dyn, time_shift_type="linear" if shifting == "linear" else
                                "exponential", shift_terminal=term, final_sigmas_type=final,
                                **KINDS[kind]))
    assert outcomes & set(EQUAL)


def test_alpha_sigma_lambda():
    """Against diffusers' _sigma_to_alpha_sigma_t, which is float32 torch arithmetic (a few float32
    rounding steps, and torch's float32 sqrt / log are not correctly rounded): ours is float64."""
    for flow in [False, True]:
        sched = DPMSolverMultistepScheduler(use_flow_sigmas=flow, flow_shift=3.0, use_karras_sigmas=not flow,
                                            **BETAS["sd"])
        sched.set_timesteps(25)
        a_ref, s_ref = sched._sigma_to_alpha_sigma_t(sched.sigmas)
        lam_ref = torch.log(a_ref) - torch.log(s_ref)
        a, s, lam = S.alpha_sigma_lambda(sched.sigmas.double(), flow=flow)
        np.testing.assert_allclose(a, a_ref.double().numpy(), rtol=6e-7, atol=0)
        np.testing.assert_allclose(s, s_ref.double().numpy(), rtol=6e-7, atol=0)
        fin = np.isfinite(lam)
        assert np.array_equal(fin, np.isfinite(lam_ref.numpy()))
        np.testing.assert_allclose(lam[fin], lam_ref.double().numpy()[fin], rtol=0, atol=2e-6)
        np.testing.assert_allclose(lam[fin], np.log(a[fin]) - np.log(s[fin]), rtol=0, atol=1e-15)


def test_float64_tables_follow_the_same_rules():
    """float64 alphas_cumprod (fastdiff's own schedules): the same rules without diffusers' float32
    roundings, so within float32 rounding of the float32 results."""
    ab32 = _ab(DPMSolverMultistepScheduler, 1000, "sd")
    ab64 = ab32.double()
    for fn, kw in [(S.euler_sigmas, dict(use_karras_sigmas=True)),
                   (S.euler_sigmas, dict(interpolation_type="log_linear")),
                   (S.euler_sigmas, dict(timestep_spacing="trailing")), (S.dpm_sigmas, dict(use_lu_lambdas=True)),
                   (S.dpm_sigmas, dict(lambda_min_clipped=-5.1)), (S.unipc_sigmas, dict(use_beta_sigmas=True))]:
        s32, t32 = fn(ab32, 14, **kw)
        s64, t64 = fn(ab64, 14, **kw)
        np.testing.assert_allclose(s64, s32, rtol=2e-6, atol=0)
        np.testing.assert_allclose(t64, t32, rtol=2e-5, atol=1.0 if t32.dtype == np.int64 else 1e-4)
    s, ls, lam, final, f32 = S.vp_table(ab64)
    ab = ab64.numpy()
    np.testing.assert_allclose(s, np.sqrt((1 - ab) / ab), rtol=1e-15)
    np.testing.assert_allclose(lam, 0.5 * np.log(ab) - 0.5 * np.log1p(-ab), rtol=1e-14, atol=1e-14)
    assert final == s[0] and not f32


# --- random configs ---------------------------------------------------------------------------

def random_config(rng, family):
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    n = int(rng.integers(1, 80))
    kind = pick(list(KINDS))
    if family == "flow":
        dyn = bool(rng.integers(2))
        N = pick([1000, 1000, 500, 1237])
        cfg = dict(shift=u(0.3, 8.0), use_dynamic_shifting=dyn,
                   time_shift_type=pick(["exponential", "linear"]) if dyn else "exponential",
                   shift_terminal=pick([None, u(0.01, 0.6)]), invert_sigmas=bool(rng.integers(2)), **KINDS[kind])
        mu = (u(0.2, 3.0) if cfg["time_shift_type"] == "linear" else u(-1.0, 3.0)) if dyn else None
        lists = pick(["none", "sigmas", "timesteps", "both"])
        return lambda: flow_case(n, lists, mu=mu, N=N, **cfg)
    betas = pick(["sd", "linear", "cosine"])
    common = dict(timestep_spacing=pick(["linspace", "leading", "trailing"]), steps_offset=int(rng.integers(2)),
                  final_sigmas_type=pick(["zero", "sigma_min"]))
    if family == "euler":
        interp = pick(["linear", "log_linear"])
        return lambda: euler_case(betas, n, interpolation_type=interp, **common, **KINDS[kind])
    if family == "dpm":
        extra = pick([KINDS[kind], dict(use_lu_lambdas=True), dict(use_flow_sigmas=True, flow_shift=u(0.5, 8.0))])
        clip = pick([-math.inf, u(-8.0, -2.0)])
        return lambda: dpm_case(betas, n, lambda_min_clipped=clip, **common, **extra)
    flow = bool(rng.integers(2))
    extra = {}
    if flow:
        extra = dict(use_flow_sigmas=True, flow_shift=u(0.5, 8.0), shift_terminal=pick([None, u(0.01, 0.5)]))
    return lambda: unipc_case(betas, n, **common, **extra, **KINDS[kind])


@pytest.mark.parametrize("family", ["flow", "euler", "dpm", "unipc"])
def test_random_configs(family):
    rng = np.random.default_rng({"flow": 11, "euler": 12, "dpm": 13, "unipc": 14}[family])
    outcomes = [random_config(rng, family)() for _ in range(50)]
    assert sum(o in EQUAL for o in outcomes) >= 40, outcomes


# --- the inverse incomplete beta function --------------------------------------------------------

def test_beta_ppf_against_scipy():
    rng = np.random.default_rng(7)
    a, b = np.exp(rng.uniform(math.log(0.1), math.log(20.0), (2, 400)))
    for ai, bi in zip(a, b):
        p = np.concatenate([rng.uniform(0, 1, 6), 10.0 ** rng.uniform(-12, -1, 2), 1 - 10.0 ** rng.uniform(-12, -1, 2)])
        x, ref = S.beta_ppf(p, ai, bi), scipy_stats.beta.ppf(p, ai, bi)
        # relative to the distance from the nearer end, and a couple of ulps for x near 1 (where
        # doubles cannot resolve 1 - x below 1e-16)
        err = np.abs(x - ref) - 2 * np.spacing(ref)
        assert (err <= 5e-14 * np.minimum(ref, 1 - ref)).all(), (ai, bi, p, x, ref)
    p = 1 - np.linspace(0, 1, 1000)  # diffusers' use: Beta(0.6, 0.6) at 1 - linspace(0, 1, n)
    np.testing.assert_allclose(S.beta_ppf(p, 0.6, 0.6), scipy_stats.beta.ppf(p, 0.6, 0.6), rtol=0, atol=2e-15)
    assert S.beta_ppf([0.0, 1.0], 0.6, 0.6).tolist() == [0.0, 1.0]
    for a, b in [(0.6, 0.6), (2.5, 3.0), (0.3, 7.0)]:  # round trip (x not so near 1 that doubles cannot hold it)
        np.testing.assert_allclose(S.C.beta_cdf(S.beta_ppf(p, a, b), a, b), p, rtol=0, atol=4e-15)


def test_beta_median_tie():
    """The one place we are 1 ulp from diffusers by design. scipy's beta.ppf(0.5, 0.6, 0.6) is
    0.5 + 2^-53 (boost's ibeta_inv, 1 ulp high; ours is 0.5, the exact median by symmetry). For odd
    n the middle beta sigma, sigma_min + ppf (sigma_max - sigma_min), is then (sigma_min + sigma_max) / 2,
    which with float32 ends can be an exact float32 tie, and scipy's excess breaks it upward."""
    assert scipy_stats.beta.ppf(0.5, 0.6, 0.6) == 0.5 + 2.0 ** -53
    assert S.beta_ppf([0.5], 0.6, 0.6)[0] == 0.5
    # Flux-like sigmas list, shift 1.7 (1 of the 50 (shift, n, list) cases tried ties and differs)
    assert flow_case(9, "sigmas", shift=1.7, use_beta_sigmas=True) == "equal but the beta median"
    shifted, _ = S.flow_sigmas(sigmas=np.linspace(1.0, 1.0 / 9, 9), shift=1.7)  # the ends beta spans
    lo, hi = shifted[-2], shifted[0]
    s, _ = S.flow_sigmas(sigmas=np.linspace(1.0, 1.0 / 9, 9), shift=1.7, use_beta_sigmas=True)
    mid = lo + 0.5 * (hi - lo)
    assert s[4] == mid and float(np.float32(mid)) != mid  # exact in float64, a float32 tie
    assert float(np.float32(lo + (0.5 + 2.0 ** -53) * (hi - lo))) > float(np.float32(mid))  # scipy's way up


# --- invalid input -----------------------------------------------------------------------------

AB = np.linspace(0.999, 0.01, 1000)
BAD = [
    (lambda: S.flow_sigmas(10, shift=-1.0), "shift must be > 0, got -1"),
    (lambda: S.flow_sigmas(10, mu=0.5), "mu is only used with use_dynamic_shifting=True"),
    (lambda: S.flow_sigmas(10, use_dynamic_shifting=True), "mu is required when use_dynamic_shifting"),
    (lambda: S.flow_sigmas(10, use_karras_sigmas=True, use_beta_sigmas=True),
     "at most one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas"),
    (lambda: S.flow_sigmas(10, use_dynamic_shifting=True, mu=1.0, time_shift_type="cubic"), "unknown time_shift_type"),
    (lambda: S.flow_sigmas(10, use_dynamic_shifting=True, mu=0.0, time_shift_type="linear"), "mu must be > 0"),
    (lambda: S.flow_sigmas(10, use_dynamic_shifting=True, mu=math.nan), "mu must be finite"),
    (lambda: S.flow_sigmas(10, shift_terminal=1.5), r"shift_terminal must lie in \(0, 1\)"),
    (lambda: S.flow_sigmas(sigmas=[1.0], shift_terminal=0.1), "last sigma before stretching below 1"),
    (lambda: S.flow_sigmas(sigmas=[0.9, 0.5], timesteps=[900.0]), "same length, got 2 and 1"),
    (lambda: S.flow_sigmas(3, sigmas=[0.9, 0.5]), "sigmas must have num_inference_steps = 3 entries, got 2"),
    (lambda: S.flow_sigmas(0), r"num_inference_steps must be an int in \[1, 2\*\*20\], got 0"),
    (lambda: S.flow_sigmas(), "num_inference_steps, sigmas or timesteps is required"),
    (lambda: S.flow_sigmas(2.5), "num_inference_steps must be an int"),
    (lambda: S.flow_sigmas(sigmas=[0.9, math.nan]), r"sigmas must be finite, got sigmas\[1\] = nan"),
    (lambda: S.flow_sigmas(sigmas=[1.5, 0.5]), r"sigmas must lie in \[0, 1\]"),
    (lambda: S.flow_sigmas(timesteps=[1200.0]), r"timesteps must lie in \[0, 1000\]"),
    (lambda: S.flow_sigmas(sigmas=[0.9, 0.0], use_exponential_sigmas=True), "sigma_min must be finite and > 0"),
    (lambda: S.flow_train_sigmas(0), r"num_train_timesteps must be an int in \[1, 2\*\*20\]"),
    (lambda: S.calculate_shift(1024, 256, 256), "max_seq_len and base_seq_len must differ"),
    (lambda: S.index_for_timestep([999.0, 500.0], 3.0), "timestep 3 is not in the schedule"),
    (lambda: S.euler_sigmas(AB, 10, timestep_spacing="uniform"), "unknown timestep_spacing 'uniform'"),
    (lambda: S.euler_sigmas(AB, 10, interpolation_type="cubic"), "unknown interpolation_type 'cubic'"),
    (lambda: S.euler_sigmas(AB, 10, final_sigmas_type="one"), "unknown final_sigmas_type 'one'"),
    (lambda: S.euler_sigmas(AB, 10, timestep_type="uniform"), "unknown timestep_type"),
    (lambda: S.euler_sigmas(AB, 10, prediction_type="flow"), "unknown prediction_type"),
    (lambda: S.euler_sigmas(AB, timesteps=[900, 10], use_karras_sigmas=True), "timesteps cannot be given with"),
    (lambda: S.euler_sigmas(AB, timesteps=[900, 10], timestep_type="continuous", prediction_type="v_prediction"),
     "timestep_type 'continuous' and v_prediction"),
    (lambda: S.euler_sigmas(AB, 10, timesteps=[900, 10]), "exactly one of num_inference_steps, timesteps or sigmas"),
    (lambda: S.euler_sigmas(AB, sigmas=[3.0]), "at least 2 values"),
    (lambda: S.euler_sigmas(AB, sigmas=[3.0, -1.0]), "sigmas must lie in"),
    (lambda: S.euler_sigmas(AB, 10, use_exponential_sigmas=True, sigma_min=0.0), "sigma_min must be finite and > 0"),
    (lambda: S.euler_sigmas(np.append(AB, 1.0), 10), r"alphas_cumprod must lie in the open interval \(0, 1\)"),
    (lambda: S.euler_sigmas(torch.tensor([0.9, float("nan")]), 1), r"alphas_cumprod\[1\] = nan"),
    (lambda: S.euler_sigmas(AB[:1], 1), "at least 2"),
    (lambda: S.euler_init_noise_sigma([1.0], "uniform"), "unknown timestep_spacing"),
    (lambda: S.dpm_sigmas(AB, 10, mu=0.5), "mu needs use_dynamic_shifting=True"),
    (lambda: S.dpm_sigmas(AB, 10, lambda_min_clipped=50.0), "clips every timestep"),
    (lambda: S.dpm_sigmas(AB, timesteps=[1000, 5]), r"timesteps must lie in \[0, 1000\)"),
    (lambda: S.dpm_sigmas(AB, timesteps=[900, 5], use_lu_lambdas=True),
     "timesteps cannot be given with use_lu_lambdas"),
    (lambda: S.dpm_sigmas(AB, timesteps=[900, 5], use_flow_sigmas=True), "use_flow_sigmas"),
    (lambda: S.dpm_sigmas(AB, 10, use_flow_sigmas=True, flow_shift=0.0), "flow_shift must be > 0, got 0"),
    (lambda: S.dpm_sigmas(AB), "num_inference_steps or timesteps is required"),
    (lambda: S.unipc_sigmas(AB, sigmas=[0.9, 0.5]), "sigmas can only be given with use_flow_sigmas=True"),
    (lambda: S.unipc_sigmas(AB, 10, use_flow_sigmas=True, use_dynamic_shifting=True), "mu is required"),
    (lambda: S.unipc_sigmas(AB, 10, shift_terminal=0.1), "shift_terminal is only supported with use_flow_sigmas"),
    (lambda: S.unipc_sigmas(AB, sigmas=[0.9], use_flow_sigmas=True, use_beta_sigmas=True), "at least 2 sigmas"),
    (lambda: S.unipc_sigmas(AB, 10, use_karras_sigmas=True, sigma_min=-1.0), "sigma_min must be finite and >= 0"),
    (lambda: S.alpha_sigma_lambda([0.5, 1.5], flow=True), r"sigmas must lie in \[0, 1\]"),
    (lambda: S.alpha_sigma_lambda([-0.5]), "sigmas must lie in"),
    (lambda: S.beta_ppf([0.5], 0.0, 1.0), "needs finite a > 0 and b > 0"),
    (lambda: S.beta_ppf([1.5], 0.6, 0.6), r"beta_ppf needs p in \[0, 1\], got 1.5"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[m for _, m in BAD])
def test_invalid_input_names_the_constraint(call, message):
    with pytest.raises(ValueError, match=message):
        call()

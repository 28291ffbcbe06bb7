"""Schedule tables (fastdiff._C) against an independent float64 computation written here."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import _C
from fastdiff.engine.schedule import Schedule, next_timesteps

COL = {name: i for i, name in enumerate(_C.COLUMNS)}


# --- independent references (numpy float64, written from the papers / diffusers' rules) ------

def ref_betas(name, n, b0, b1):
    if name == "linear":
        return np.linspace(b0, b1, n, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    if name == "sigmoid":
        x = np.linspace(-6, 6, n)
        return 1 / (1 + np.exp(-x)) * (b1 - b0) + b0
    raise AssertionError(name)


def ref_zero_snr(betas):
    ab = np.cumprod(1 - betas)
    s = np.sqrt(ab)
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    ab = s ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def ref_timesteps(n, k, spacing, offset):
    if spacing == "linspace":
        return np.linspace(0, n - 1, k).round()[::-1].astype(np.int64)
    if spacing == "leading":
        r = n // k
        return (np.arange(0, k) * r).round()[::-1].astype(np.int64) + offset
    if spacing == "trailing":
        # numpy's arange gives k + 1 values for some (n, k) through rounding (the last one -1);
        # fastdiff keeps the first k.
        return (np.round(np.arange(n, 0, -n / k)).astype(np.int64) - 1)[:k]
    raise AssertionError(spacing)


def ab_at(ab, t, final):
    return ab[t] if t >= 0 else final


# --- betas / alpha_bar --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("n,b0,b1", [(1000, 1e-4, 0.02), (37, 8.5e-4, 0.012), (2, 0.1, 0.3)])
def test_betas_match_float64_reference(name, n, b0, b1):
    got = _C.make_betas(name, n, b0, b1)
    want = ref_betas(name, n, b0, b1)
    assert got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    np.testing.assert_allclose(_C.alphas_cumprod(got), np.cumprod(1 - want), rtol=1e-12)


def test_cosine_alias_and_schedule_object():
    s = Schedule("cosine", num_train_timesteps=500)
    np.testing.assert_array_equal(s.betas.numpy(), _C.make_betas("squaredcos_cap_v2", 500, 0, 0))
    assert s.alphas_cumprod.dtype == torch.float64
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr(name):
    betas = ref_betas(name, 1000, 8.5e-4, 0.012)
    got = _C.rescale_zero_terminal_snr(betas)
    np.testing.assert_allclose(got, ref_zero_snr(betas), rtol=1e-10, atol=1e-15)
    ab = _C.alphas_cumprod(got)
    assert ab[-1] == 0.0
    np.testing.assert_allclose(ab[0], 1 - betas[0], rtol=1e-12)
    s = Schedule(name, beta_start=8.5e-4, beta_end=0.012, rescale_betas_zero_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0


def test_trained_betas_roundtrip():
    rng = np.random.default_rng(0)
    betas = np.sort(rng.uniform(1e-4, 0.05, 64))
    s = Schedule(trained_betas=betas.tolist())
    assert s.num_train_timesteps == 64
    np.testing.assert_array_equal(s.betas.numpy(), betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-13)
    s2 = Schedule(trained_betas=torch.tensor(betas))
    np.testing.assert_array_equal(s2.betas.numpy(), betas)


# --- timesteps -------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_all_step_counts(spacing):
    for n in (1000, 97, 10):
        for k in range(1, n + 1) if n < 100 else list(range(1, 60)) + [100, 250, 333, 999, 1000]:
            for offset in ((0, 1) if spacing == "leading" and n // k * (k - 1) + 1 < n else (0,)):
                got = _C.make_timesteps(n, k, spacing, offset)
                want = ref_timesteps(n, k, spacing, offset)
                np.testing.assert_array_equal(got, want, err_msg=f"n={n} k={k} {spacing} offset={offset}")


def test_timesteps_descending_and_in_range():
    for spacing in ("leading", "trailing", "linspace"):
        ts = Schedule().timesteps(50, spacing)
        assert len(ts) == 50 and np.all(np.diff(ts) < 0) and ts[0] < 1000 and ts[-1] >= 0


def test_custom_timesteps():
    ts = Schedule().timesteps(timesteps=[999, 500, 20, 3])
    np.testing.assert_array_equal(ts, [999, 500, 20, 3])
    np.testing.assert_array_equal(next_timesteps(ts), [500, 20, 3, -1])


# --- coefficient tables ------------------------------------------------------------------------

def _random_plan(rng, n=1000, k=13):
    ts = np.sort(rng.choice(np.arange(1, n), size=k, replace=False))[::-1].astype(np.int64)
    return ts, next_timesteps(ts)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("final", [1.0, None])
def test_ddim_table(eta, final):
    rng = np.random.default_rng(1)
    ab = np.cumprod(1 - ref_betas("scaled_linear", 1000, 8.5e-4, 0.012))
    ts, prev = _random_plan(rng)
    final_ab = ab[0] if final is None else final
    tab = _C.ddim_table(ab, ts, prev, eta, final_ab)
    assert tab.shape == (len(ts), _C.NCOL) and tab.dtype == np.float64
    for i, (t, s) in enumerate(zip(ts, prev)):
        a_t, a_s = ab[t], ab_at(ab, s, final_ab)
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        lam = eta * math.sqrt(var)
        row = tab[i]
        assert row[COL["a_t"]] == pytest.approx(math.sqrt(a_t), rel=1e-14)
        assert row[COL["b_t"]] == pytest.approx(math.sqrt(1 - a_t), rel=1e-14)
        assert row[COL["c_x0"]] == pytest.approx(math.sqrt(a_s), rel=1e-14)
        assert row[COL["c_eps"]] == pytest.approx(math.sqrt(max(1 - a_s - lam ** 2, 0)), rel=1e-12, abs=1e-15)
        assert row[COL["c_xt"]] == 0
        assert row[COL["std"]] == pytest.approx(lam, rel=1e-12, abs=1e-300)
        # OCM: d x_s / d x0 at fixed x_t
        want_cov = math.sqrt(a_s) - math.sqrt(max(1 - a_s - lam ** 2, 0)) * math.sqrt(a_t / (1 - a_t))
        assert row[COL["c_cov"]] == pytest.approx(want_cov, rel=1e-10, abs=1e-14)
        assert row[COL["cov_scale"]] == pytest.approx((1 - a_t) / a_t, rel=1e-13)
        assert row[COL["t"]] == t and row[COL["prev_t"]] == (s if s >= 0 else -1)
        assert row[COL["noise"]] == (1.0 if s >= 0 else 0.0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log"])
@pytest.mark.parametrize("rule", ["last", "t_zero"])
def test_ddpm_table(variance_type, rule):
    rng = np.random.default_rng(2)
    ab = np.cumprod(1 - ref_betas("linear", 1000, 1e-4, 0.02))
    ts, prev = _random_plan(rng)
    ts[-1] = 0 if rule == "t_zero" else ts[-1]
    ts = np.sort(np.unique(ts))[::-1].copy()
    prev = next_timesteps(ts)
    tab = _C.ddpm_table(ab, ts, prev, variance_type, 1.0, rule)
    for i, (t, s) in enumerate(zip(ts, prev)):
        a_t, a_s = ab[t], ab_at(ab, s, 1.0)
        beta_ts = 1 - a_t / a_s
        tilde = (1 - a_s) / (1 - a_t) * beta_ts
        row = tab[i]
        assert row[COL["c_x0"]] == pytest.approx(math.sqrt(a_s) * beta_ts / (1 - a_t), rel=1e-13)
        assert row[COL["c_xt"]] == pytest.approx(math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t), rel=1e-13)
        assert row[COL["c_eps"]] == 0
        noisy = (s >= 0) if rule == "last" else (t > 0)
        v = tilde if "small" in variance_type else beta_ts
        assert row[COL["std"]] == pytest.approx(math.sqrt(max(v, 1e-20)) if noisy else 0.0, rel=1e-12)
        assert row[COL["log_var_min"]] == pytest.approx(math.log(max(tilde, 1e-20)), rel=1e-12)
        assert row[COL["log_var_max"]] == pytest.approx(math.log(beta_ts), rel=1e-12)
        assert row[COL["c_cov"]] == pytest.approx(row[COL["c_x0"]], rel=1e-15)


def test_consistency_table():
    ab = np.cumprod(1 - ref_betas("linear", 1000, 1e-4, 0.02))
    ts = np.array([999, 600, 300], dtype=np.int64)
    tab = _C.consistency_table(ab, ts, next_timesteps(ts))
    np.testing.assert_allclose(tab[:2, COL["c_x0"]], np.sqrt(ab[[600, 300]]), rtol=1e-14)
    np.testing.assert_allclose(tab[:2, COL["std"]], np.sqrt(1 - ab[[600, 300]]), rtol=1e-14)
    assert tab[2, COL["c_x0"]] == 1.0 and tab[2, COL["std"]] == 0.0 and tab[2, COL["noise"]] == 0.0


def test_sampler_tables_use_next_timestep():
    s = fastdiff.DDIMSampler(steps=7, eta=0.3, timestep_spacing="linspace")
    tab = s.table.host
    np.testing.assert_array_equal(tab[:, COL["t"]], s.timesteps)
    np.testing.assert_array_equal(tab[:, COL["prev_t"]], next_timesteps(s.timesteps))
    s2 = fastdiff.DDIMSampler(steps=7, timestep_spacing="leading", prev_timestep_rule="ratio")
    np.testing.assert_array_equal(s2.table.host[:, COL["prev_t"]],
                                  np.where(s2.timesteps - 1000 // 7 >= 0, s2.timesteps - 1000 // 7, -1))


# --- invalid input -------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: _C.make_timesteps(1000, 0, "leading", 0), "must be >= 1"),
    (lambda: _C.make_timesteps(1000, 1001, "leading", 0), "must not exceed num_train_timesteps"),
    (lambda: _C.make_timesteps(1000, 10, "uniform", 0), "unknown timestep_spacing 'uniform'"),
    (lambda: _C.make_timesteps(1000, 1000, "leading", 1), r"outside \[0, 1000\)"),
    (lambda: _C.make_betas("quadratic", 1000, 1e-4, 0.02), "unknown beta_schedule 'quadratic'"),
    (lambda: _C.make_betas("linear", 0, 1e-4, 0.02), r"num_train_timesteps must be an int in \[1, 2\*\*20\]"),
    (lambda: _C.make_betas("linear", 10, 0.0, 0.02), r"open interval \(0, 1\).*betas\[0\] = 0"),
    (lambda: _C.make_betas("linear", 10, 1e-4, 1.5), r"open interval \(0, 1\).*betas\[6\] = 1.000"),
    (lambda: Schedule(trained_betas=[0.1, 1.0, 0.2]), r"open interval \(0, 1\).*betas\[1\]"),
    (lambda: Schedule(trained_betas=[0.1, float("nan")]), r"open interval \(0, 1\)"),
    (lambda: Schedule(trained_betas=[]), "must not be empty"),
    (lambda: Schedule().timesteps(timesteps=[10, 500, 3]), "strictly descending"),
    (lambda: Schedule().timesteps(timesteps=[10, 10, 3]), "strictly descending"),
    (lambda: Schedule().timesteps(timesteps=[1000, 3]), r"\[0, num_train_timesteps=1000\)"),
    (lambda: Schedule().timesteps(timesteps=[5, -1]), r"\[0, num_train_timesteps=1000\)"),
    (lambda: Schedule().timesteps(None), "steps .* is required"),
    (lambda: Schedule().timesteps(2.5), "steps must be an int"),
    (lambda: Schedule(num_train_timesteps=10.0), "num_train_timesteps must be an int"),
    (lambda: _C.ddim_table([0.9, 0.5], [1], [0], -0.1, 1.0), "eta must be a finite number >= 0"),
    (lambda: _C.ddim_table([0.9, 0.5], [2], [0], 0.0, 1.0), r"timesteps must lie in \[0, 2\)"),
    (lambda: _C.ddim_table([0.9, 0.5], [1, 0], [0], 0.0, 1.0), "same length"),
    (lambda: _C.ddim_table([0.9, 1.5], [1], [0], 0.0, 1.0), r"alphas_cumprod must lie in \[0, 1\]"),
    (lambda: _C.ddpm_table([0.9, 0.5], [1], [0], "fixed_medium", 1.0, "last"), "unknown variance_type"),
    (lambda: _C.ddpm_table([0.9, 0.5], [1], [0], "fixed_small", 1.0, "never"), "unknown noise_rule"),
    (lambda: _C.rescale_zero_terminal_snr([0.1]), "at least 2 betas"),
])
def test_invalid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_coerce_errors():
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        Schedule.coerce(3.0)
    assert Schedule.coerce("scaled_linear").beta_schedule == "scaled_linear"
    assert Schedule.coerce({"num_train_timesteps": 50}).num_train_timesteps == 50

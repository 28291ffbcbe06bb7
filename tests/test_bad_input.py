"""Bad input and newcomer friction (issue 14): every silent-wrong path refused or made safe, every
unclear error naming its constraint, on the torch path and the Triton path (the interpreter on a
CPU) alike. One test (or group) per item of the issue, numbered as there."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import StepOptions, step
from fastdiff.engine import checks
from fastdiff.engine import step as step_module
from fastdiff.engine.kernels import philox

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", "triton"]
LINEAR = lambda x, t: 0.1 * x  # noqa: E731 - a model: (x_t, t) -> epsilon


def _xm(shape=(2, 3, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


# -- 1. a row index outside the table ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_01_out_of_range_index_reads_the_nearest_row_on_both_backends(backend):
    table = fastdiff.DDPMSampler(None, 6).table  # noisy rows: the index also keys the noise
    x, m = _xm()
    seed = torch.tensor([7])
    first = step(x, m, table, torch.tensor([0]), seed=seed, backend=backend)
    last = step(x, m, table, torch.tensor([5]), seed=seed, backend=backend)
    for idx, want in ((-1, first), (-(2**40), first), (6, last), (2**31 - 1, last)):
        dtype = torch.int32 if abs(idx) < 2**31 else torch.int64
        got = step(x, m, table, torch.tensor([idx], dtype=dtype), seed=seed, backend=backend)
        assert torch.equal(got, want), idx
    ref = step(x, m, table, torch.tensor([99]), seed=seed, backend="torch")
    assert torch.allclose(step(x, m, table, torch.tensor([99]), seed=seed, backend=backend), ref, rtol=0, atol=1e-5)
    assert "nearest row" in step.__doc__ and "never read past the table" in step.__doc__


# -- 2. outputs that share memory -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_02_outputs_sharing_memory_are_refused(backend):
    table = fastdiff.DDIMSampler(None, 4).table
    x, m = _xm((2, 3, 4))
    i = torch.tensor([1])
    buf = torch.empty(2 * 3 * 4 + 1)
    bad = [
        (dict(out=torch.zeros(1, 1, 1).expand(2, 3, 4)), "overlapping memory"),
        (dict(out=buf[:24].view(2, 3, 4), x0_out=buf[:24].view(2, 3, 4)), "must be different tensors"),
        (dict(out=buf[:24].view(2, 3, 4), x0_out=buf[1:].view(2, 3, 4)), "must be different tensors"),
    ]
    o = torch.empty_like(x)
    bad.append((dict(out=o, x0_out=o), "must be different tensors"))
    shifted = torch.randn(25)
    bad.append((dict(x=shifted[1:].view(2, 3, 4), out=shifted[:24].view(2, 3, 4)), "shares memory with x"))
    bad.append((dict(out=m.as_strided((2, 3, 4), (12, 1, 3))), "shares memory with model_output"))
    for kw, match in bad:
        kw = dict(kw)
        xx = kw.pop("x", x)
        with pytest.raises(ValueError, match=match):
            step(xx, m, table, i, backend=backend, **kw)
    # Exact aliases are in place and give what a separate output gives, on both backends.
    want, want_x0 = step(x, m, table, i, backend=backend, return_x0=True)
    xi, mi = x.clone(), m.clone()
    step(xi, mi, table, i, backend=backend, out=xi, x0_out=mi)
    assert torch.equal(xi, want) and torch.equal(mi, want_x0)


# -- 3. an integer table ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_03_non_floating_table_is_refused(backend, dtype):
    x, m = _xm()
    table = torch.ones(3, len(fastdiff.COLUMNS)).to(dtype)
    with pytest.raises(ValueError, match="table must be a floating-point tensor"):
        step(x, m, table, torch.tensor([0]), backend=backend)


# -- 4. randn's stream and step ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_04_randn_counter_words_have_one_validated_range(backend):
    for kw in (dict(stream=-1), dict(stream=2**31), dict(stream=2**32), dict(stream=1.5), dict(stream=True),
               dict(step=-1), dict(step=2**31)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"randn: {name} must be an int in \[0, 2\*\*31\)"):
            philox.randn((8,), 3, backend=backend, **kw)
    # The largest valid words: finite and the same numbers on both backends.
    z = philox.randn((37,), 3, step=2**31 - 1, stream=2**31 - 1, backend=backend)
    ref = philox.randn((37,), 3, step=2**31 - 1, stream=2**31 - 1, backend="torch")
    assert torch.isfinite(z).all() and torch.allclose(z, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(z, philox.randn((37,), 3, step=2**31 - 2, stream=2**31 - 1, backend=backend))


# -- 5. alpha_bar underflowing float32 --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "ocm-ddpm"])
def test_05_float32_underflow_raises_naming_the_limit(backend, sampler):
    """Linear betas over 50000 timesteps: alpha_bar ~ 1e-220 is fine in float64, sqrt(alpha_bar)
    is 0 in float32, and an epsilon step divides by it. Refused before any arithmetic; a
    v-prediction (no division) samples finite numbers."""
    sched = fastdiff.Schedule("linear", num_train_timesteps=50000)
    kw = dict(head=lambda x, t: torch.zeros_like(x)) if sampler.startswith("ocm") else {}
    with pytest.raises(ValueError, match=r"a_t at row 0 is 1.\d+e-1\d\d, below 1e-30.*epsilon"):
        fastdiff.sample(LINEAR, (2, 4), sampler=sampler, steps=5, schedule=sched, backend=backend, **kw)
    x = fastdiff.sample(LINEAR, (2, 4), sampler=sampler, steps=5, schedule=sched, backend=backend,
                        prediction_type="v_prediction", **kw)
    assert torch.isfinite(x).all()
    # float64 through the step computes in float64: no limit there.
    table = fastdiff.make_sampler(sampler, sched, 5, **kw).table
    x64, m64 = (t.double() for t in _xm((2, 4)))
    assert torch.isfinite(step(x64, m64, table, torch.tensor([0]), backend=backend)).all()
    # A sample prediction divides by b_t only when it recomputes eps.
    assert torch.isfinite(fastdiff.sample(LINEAR, (2, 4), sampler=sampler, steps=5, schedule=sched, backend=backend,
                                          prediction_type="sample", **kw)).all()


def test_05_float32_limit_is_the_tables_business():
    table = fastdiff.Table(np.tile(fastdiff.DDIMSampler(None, 3).table.host[:1], (3, 1)))
    assert table.tiny_divisors == {}
    host = table.host.copy()
    host[2, fastdiff.COLUMNS.index("b_t")] = 1e-35
    tiny = fastdiff.Table(host)
    assert tiny.tiny_divisors == {"b_t": (2, 1e-35)}
    x, m = _xm((2, 4))
    step(x, m, tiny, torch.tensor([0]))  # epsilon: does not divide by b_t
    with pytest.raises(ValueError, match="b_t at row 2 is 1e-35"):
        step(x, m, tiny, torch.tensor([0]), prediction_type="sample", recompute_eps=True)


# -- 6. the ratio rule with custom timesteps --------------------------------------------------

def test_06_ratio_rule_with_custom_timesteps_is_refused():
    with pytest.raises(ValueError, match="prev_timestep_rule='ratio'.*explicit timesteps"):
        fastdiff.DDIMSampler(None, None, timesteps=[900, 500, 100], prev_timestep_rule="ratio")
    assert fastdiff.DDIMSampler(None, 10, prev_timestep_rule="ratio").prev_timesteps[0] == 899


# -- 7. silent coercions ----------------------------------------------------------------------

def test_07_non_integral_values_are_refused_not_truncated():
    with pytest.raises(ValueError, match=r"shape must be .* positive sizes .*got \(2.5, 3\)"):
        fastdiff.sample(LINEAR, (2.5, 3), steps=2)
    for make in (lambda ts: fastdiff.DDIMSampler(None, None, timesteps=ts),
                 lambda ts: fastdiff.DDPMSampler(None, None, timesteps=ts)):
        for ts in ([5.7, 3.2], np.array([5.0, 3.5]), torch.tensor([9.0, 2.5])):
            with pytest.raises(ValueError, match=r"timesteps must hold integers, got timesteps\[\d\] = \d\.\d"):
                make(ts)
        # whole numbers given as floats (np.linspace output) are what they say
        assert make(np.array([9.0, 4.0, 0.0])).timesteps.tolist() == [9, 4, 0]
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got 1.5"):
        fastdiff.randn((4,), 1.5)
    with pytest.raises(ValueError, match="seed tensor must hold one integer"):
        fastdiff.randn((4,), torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        fastdiff.sample(LINEAR, (2, 3), steps=2, seed=1.5)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_07_non_floating_heads_and_models_are_refused(dtype):
    with pytest.raises(TypeError, match=f"covariance head must return a floating-point tensor, got {dtype}"):
        fastdiff.sample(LINEAR, (2, 3), sampler="ocm-ddpm", steps=2, head=lambda x, t: torch.zeros_like(x).to(dtype))
    with pytest.raises(ValueError, match=f"model_output must be float32, float16 or bfloat16.*got {dtype}"):
        fastdiff.sample(lambda x, t: x.to(dtype), (2, 3), sampler="ddpm", steps=2)


# -- 8. errors that name the range ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_08_sample_offset_errors_name_the_range(backend):
    x, m = _xm()
    table = fastdiff.DDPMSampler(None, 3).table
    for bad in (2**64, 2**62, 1.5, None, -1, True, "3"):
        with pytest.raises(ValueError, match=r"sample_offset must be an int in \[0, 2\*\*62\)"):
            step(x, m, table, torch.tensor([0]), seed=torch.tensor([1]), sample_offset=bad, backend=backend)
        with pytest.raises(ValueError, match=r"sample_offset must be an int in \[0, 2\*\*62\)"):
            fastdiff.sample(LINEAR, (2, 3), sampler="ddpm", steps=2, sample_offset=bad, backend=backend)
    with pytest.raises(ValueError, match=r"below 2\*\*62"):  # in range, but the element index would not be
        step(x, m, table, torch.tensor([0]), seed=torch.tensor([1]), sample_offset=2**62 // 15, backend=backend)
    z = step(x, m, table, torch.tensor([0]), seed=torch.tensor([1]), sample_offset=np.int64(2**62 // 15 - 2),
             backend=backend)
    assert torch.isfinite(z).all()


def test_08_schedule_sizes_name_the_range():
    for n in (2**62, 2**63, 2**20 + 1, 0, 1.5):
        with pytest.raises(ValueError, match=r"num_train_timesteps must be an int in \[1, 2\*\*20\]"):
            fastdiff.Schedule("linear", num_train_timesteps=n)
        with pytest.raises(ValueError, match=r"num_train_timesteps must be an int in \[1, 2\*\*20\]"):
            fastdiff.FlowSchedule(num_train_timesteps=n)
    with pytest.raises(ValueError, match=r"num_train_timesteps must be an int in \[1, 2\*\*20\]"):
        fastdiff._C.make_betas("linear", 2**21, 1e-4, 0.02)  # the compiled module checks it too
    for off in (2**63, -1, 1000, 1.5):
        with pytest.raises(ValueError, match=r"steps_offset must be an int in \[0, 1000\)"):
            fastdiff.DDIMSampler(None, 5, timestep_spacing="leading", steps_offset=off)
    with pytest.raises(ValueError, match=r"sampling steps \(9223372036854775808\) must not exceed num_train_timesteps"):
        fastdiff.DDIMSampler(None, 2**63)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 2.5"):
        fastdiff.DDIMSampler(None, 2.5)
    with pytest.raises(ValueError, match="must not exceed num_train_timesteps"):
        fastdiff.DDIMSampler(None, 1001)


# -- 9. numpy and 0-d tensor scalars ----------------------------------------------------------

def test_09_numpy_and_0d_tensor_scalars_are_numbers():
    base = fastdiff.DDIMSampler(None, 5, eta=0.5, clip_sample=True, clip_sample_range=0.75)
    for eta, rng, steps in ((np.float32(0.5), np.float64(0.75), np.int64(5)),
                            (torch.tensor(0.5), torch.tensor(0.75), torch.tensor(5)),
                            (np.float16(0.5), 0.75, np.int32(5))):
        s = fastdiff.DDIMSampler(None, steps, eta=eta, clip_sample=True, clip_sample_range=rng)
        assert s.table.key == base.table.key and s.options == base.options and type(s.eta) is float
    ocm = fastdiff.OCMDDPMSampler(None, 4, cov_max=np.float32(0.5), clip_pixels=torch.tensor(2.0))
    assert ocm.cov_max == 0.5 and ocm.clip_pixels == 2.0
    assert fastdiff.StepOptions(clip_range=np.float32(1.5), cov_max=torch.tensor(2.0)).clip_range == 1.5
    flow = fastdiff.FlowSchedule(shift=np.float32(3.0), num_train_timesteps=np.int64(1000))
    assert flow.shift == 3.0 and flow.num_train_timesteps == 1000
    a = fastdiff.sample(LINEAR, (2, 3), sampler="ddpm", steps=3, seed=torch.tensor(4), sample_offset=np.int64(1))
    assert torch.equal(a, fastdiff.sample(LINEAR, (2, 3), sampler="ddpm", steps=3, seed=4, sample_offset=1))
    for bad in ("0.5", True, 0.5j, float("nan"), float("inf"), -0.1, torch.tensor([0.5, 0.5])):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            fastdiff.DDIMSampler(None, 5, eta=bad)


def test_09_check_helpers_say_one_thing():
    assert checks.check_int("n", np.int16(3), 0, 5) == 3 and checks.check_int("n", torch.tensor(2)) == 2
    assert checks.check_real("r", torch.tensor(2, dtype=torch.int32)) == 2.0
    with pytest.raises(ValueError, match=r"^n must be an int in \[0, 5\], got 6$"):
        checks.check_int("n", 6, 0, 5)
    with pytest.raises(ValueError, match=r"^r must be a number in \(0, 1\], got 0$"):
        checks.check_real("r", 0, 0, 1, lo_open=True, allow_inf=True)
    assert checks.check_real("r", math.inf, 0, allow_inf=True) == math.inf


# -- 10. thresholding on large latents --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_10_thresholding_beyond_torch_quantile_limit_is_exact(backend, monkeypatch):
    """Rows longer than torch.quantile takes go through kthvalue and give torch.quantile's
    numbers bit for bit (checked here with the limit lowered, so the tensors stay small)."""
    x, m = _xm((3, 4, 7, 9), seed=2)
    table = fastdiff.DDIMSampler(None, 6).table
    opts = StepOptions(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.8)
    want = step(x, m, table, torch.tensor([2]), opts, backend=backend, return_x0=True)
    monkeypatch.setattr(step_module, "QUANTILE_MAX_ROW", 16)
    got = step(x, m, table, torch.tensor([2]), opts, backend=backend, return_x0=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    gen = torch.Generator().manual_seed(3)
    for n in (17, 100, 1001):
        for dtype in (torch.float32, torch.float64):
            flat = torch.randn(3, n, generator=gen, dtype=dtype).abs()
            flat[1, 5] = math.nan
            for q in (0.995, 0.5, 1.0, 0.123):  # bit for bit, NaN where the row holds one
                assert torch.allclose(step_module.quantile_rows(flat, q), torch.quantile(flat, q, dim=1), rtol=0,
                                      atol=0, equal_nan=True), (n, dtype, q)


def test_10_a_row_past_torch_quantile_limit():
    n = step_module.QUANTILE_MAX_ROW + 1
    with pytest.raises(RuntimeError, match="quantile\\(\\) input tensor is too large"):
        torch.quantile(torch.zeros(1, n), 0.5, dim=1)
    flat = torch.randperm(n, generator=torch.Generator().manual_seed(0)).double().unsqueeze(0)
    got = step_module.quantile_rows(flat, 0.995)
    assert got.item() == pytest.approx(float(np.quantile(np.arange(n, dtype=np.float64), 0.995)), rel=1e-15)


# -- 11. the CLI's rough edges ----------------------------------------------------------------

def _cli_error(args, capsys, monkeypatch):
    from fastdiff import cli, demo

    monkeypatch.setattr(demo, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled first")))
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_11_cli_checks_out_and_sizes_before_sampling(tmp_path, capsys, monkeypatch):
    (tmp_path / "d.png").mkdir()
    err = _cli_error(["sample", "--out", str(tmp_path / "d.png")], capsys, monkeypatch)
    assert "fastdiff sample: error:" in err and "is a directory" in err
    err = _cli_error(["sample", "--out", str(tmp_path / "x.png" / "y.png")], capsys, monkeypatch)
    assert "does not exist" in err
    err = _cli_error(["sample", "--out", "/proc/fastdiff-cannot-write.png"], capsys, monkeypatch)
    assert "cannot be written" in err
    keep = tmp_path / "keep.png"
    keep.write_bytes(b"old")
    err = _cli_error(["sample", "--out", str(keep), "--n", "4096", "--nrow", "1", "--scale", "64"], capsys,
                     monkeypatch)
    assert "514x2101249 px grid" in err and "at most 16384 px" in err
    assert keep.read_bytes() == b"old"
    assert "--nrow must be in [1, 4096]" in _cli_error(["sample", "--nrow", "10000000"], capsys, monkeypatch)
    assert "fastdiff sample: error: --out must name a .png file" in _cli_error(["sample", "--out", "x.jpg"], capsys,
                                                                               monkeypatch)
    new = tmp_path / "new.png"
    with pytest.raises(AssertionError, match="sampled first"):  # every check passed, then sampling began
        _cli_error(["sample", "--out", str(new)], capsys, monkeypatch)
    assert not new.exists()  # the writability probe leaves nothing behind


def test_11_cli_bench_backend_is_a_usage_error(capsys, monkeypatch):
    from fastdiff import cli
    from fastdiff.engine import backend

    monkeypatch.setattr(backend, "interpreting", lambda: False)  # as on a CPU machine outside the tests
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cpu", "--backend", "triton", "--repeat", "1", "--shape", "2x2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fastdiff bench: error:" in err and "needs CUDA tensors" in err


# -- 12. the drop-ins' step inputs ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_12_dropin_steps_refuse_bad_tensors_alike(backend):
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    x, m = _xm((2, 3, 4, 4))
    ddpm, ddim, flow = DDPMScheduler(), DDIMScheduler(), FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    for s in (ddpm, ddim, flow):
        s.set_timesteps(10)
        s.backend = backend
    steps = [lambda mo, xs, **k: ddpm.step(mo, ddpm.timesteps[0], xs, **k),
             lambda mo, xs, **k: ddim.step(mo, ddim.timesteps[0], xs, eta=0.5, **k),
             lambda mo, xs, **k: flow.step(mo, flow.timesteps[0], xs)]
    for j, run in enumerate(steps):
        with pytest.raises(TypeError, match="model_output must be a torch.Tensor, got NoneType"):
            run(None, x)
        with pytest.raises(TypeError, match="sample must be a torch.Tensor, got NoneType"):
            run(m, None)
        for dtype in (torch.int64, torch.bool, torch.complex64):
            with pytest.raises(TypeError, match=f"model_output must be a floating-point tensor.*got {dtype}"):
                run(m.to(dtype), x)
            with pytest.raises(TypeError, match=f"sample must be a floating-point tensor.*got {dtype}"):
                run(m, x.to(dtype))
        if j < 2:
            for xs in (x, x.double()):
                with pytest.raises(TypeError, match="variance_noise must be a floating-point tensor.*torch.int64"):
                    run(m.to(xs.dtype), xs, variance_noise=torch.ones_like(xs, dtype=torch.int64))
    # float64 noise for a float32 step: rounded to float32, the same result on both backends
    noise = torch.randn_like(x, dtype=torch.float64)
    got = ddim.step(m, ddim.timesteps[0], x, eta=0.5, variance_noise=noise).prev_sample
    want = ddim.step(m, ddim.timesteps[0], x, eta=0.5, variance_noise=noise.float()).prev_sample
    assert got.dtype == torch.float32 and torch.equal(got, want)
    ddim.set_noise_seed(np.int64(3))
    ddim.set_noise_seed(torch.tensor(3))
    assert ddim.noise_seed == 3
    ddpm.set_timesteps(torch.tensor(7))
    assert len(ddpm.timesteps) == 7
    with pytest.raises(ValueError, match=r"timesteps must hold integers, got timesteps\[0\] = 5.7"):
        ddpm.set_timesteps(timesteps=[5.7, 3.2])


# -- 13. shapes, DDPM's eta, devices ----------------------------------------------------------

def test_13_shape_eta_and_device_errors_are_one_line():
    for shape in ("2,3,8,8", 32, 2.0, torch.tensor([2, 3])):
        with pytest.raises(ValueError, match="shape must be a tuple of ints with the batch first, such as"):
            fastdiff.sample(LINEAR, shape, steps=2)
    with pytest.raises(TypeError, match="DDPM has no eta.*sampler='ddim'"):
        fastdiff.sample(LINEAR, (2, 3), sampler="ddpm", steps=2, eta=0.5)
    with pytest.raises(TypeError, match="DDPM has no eta"):
        fastdiff.OCMDDPMSampler(None, 2, eta=0.0)
    with pytest.raises(ValueError, match="device must be a torch device such as 'cpu' or 'cuda', got 'cdua'"):
        fastdiff.sample(LINEAR, (2, 3), steps=2, device="cdua")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda' was asked for but .*use device='cpu'$"):
            fastdiff.sample(LINEAR, (2, 3), steps=2, device="cuda")


# -- 14-16. installing: source only, triton an extra, the honest torch note --------------------

def test_14_to_16_install_lines_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert any(d.startswith("triton") for d in extras["triton"])
    need = {name: any(d.startswith(name) for d in extras["test"]) for name in ("pytest", "numpy", "diffusers", "triton")}
    assert all(need.values()), need  # CI installs .[test] and runs the interpreter tests
    assert any(d.startswith("pytest-benchmark") for d in extras["bench"])
    readme = (ROOT / "README.md").read_text()
    commands = [ln for block in readme.split("```bash\n")[1:] for ln in block.split("```")[0].splitlines()]
    installs = [c for c in commands if "pip install" in c]
    assert len(installs) >= 2
    for line in installs:
        for part in line.split("&&"):
            if "pip install" in part:
                assert "fastdiff" not in part.split("pip install", 1)[1], line  # never the PyPI name
    assert "The PyPI name `fastdiff` belongs to an unrelated" in readme
    assert 'pip install ".[diffusers]"' in readme
    assert "download.pytorch.org/whl/cpu" in readme and "is the CUDA build" in readme
    assert "only so that pip does not fetch" not in readme  # the old claim, untrue on PyPI


# -- 17. benchmark scripts check their imports first ------------------------------------------

def test_17_quality_script_stops_before_running_without_matplotlib(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            f"sys.path[:0] = [{str(ROOT / 'benchmarks')!r}, {str(ROOT)!r}]\n"
            f"import quality; quality.main(['--quick', '--out', {str(tmp_path / 'q.md')!r}])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "needs matplotlib" in res.stderr and 'pip install ".[bench]"' in res.stderr
    assert not (tmp_path / "q.md").exists()


# -- 18. progress on a terminal ---------------------------------------------------------------

@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_18_cli_progress_on_a_terminal_only(tty, quiet, shown, tmp_path, monkeypatch):
    from fastdiff import cli, demo

    seen = {}

    def fake_sample(*a, progress=False, **k):
        seen["progress"] = progress
        return torch.zeros(4, 1, 8, 8)

    monkeypatch.setattr(demo, "sample", fake_sample)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    args = ["sample", "--n", "4", "--steps", "1", "--out", str(tmp_path / "d.png")] + (["--quiet"] if quiet else [])
    assert cli.main(args) == 0 and seen["progress"] is shown


def test_18_progress_bar_counts_the_steps(capsys):
    fastdiff.sample(LINEAR, (2, 3), sampler="ddim", steps=4, progress=True)
    assert "fastdiff ddim" in capsys.readouterr().err


# -- 19. python -m fastdiff, --version, help(fastdiff.sample) ---------------------------------

def test_19_module_entry_point_version_and_help():
    res = subprocess.run([sys.executable, "-m", "fastdiff", "--version"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == f"fastdiff {fastdiff.__version__}", res.stderr
    doc = fastdiff.sample.__doc__
    missing = [name for name in fastdiff.SAMPLERS if f'"{name}"' not in doc]
    assert not missing, f"help(fastdiff.sample) does not list {missing}"
    for kw in ("shape", "steps", "seed", "sample_offset", "device", "dtype", "cuda_graph", "prediction_type", "eta",
               "timestep_spacing", "head"):
        assert f"``{kw}" in doc, kw


# -- 20. saving a swapped pipeline ------------------------------------------------------------

def test_20_unswapped_pipeline_saves_for_plain_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.diffusers import DDPMScheduler, swap_scheduler, unswap_scheduler

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                                 layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                 norm_num_groups=4)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(variance_type="fixed_large"))
    swap_scheduler(pipe)
    assert type(pipe.scheduler) is DDPMScheduler
    pipe.save_pretrained(tmp_path / "fast")
    assert json.loads((tmp_path / "fast" / "model_index.json").read_text())["scheduler"][0] == "fastdiff.diffusers"
    unswap_scheduler(pipe)
    assert type(pipe.scheduler) is diffusers.DDPMScheduler and pipe.scheduler.config.variance_type == "fixed_large"
    pipe.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                                            "DDPMScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path / "plain")
    assert type(loaded.scheduler) is diffusers.DDPMScheduler
    assert unswap_scheduler(loaded) is loaded  # not a drop-in: left as it is
    assert "unswap_scheduler(pipe); pipe.save_pretrained(path)" in (ROOT / "README.md").read_text()


# -- 21. what "match" means -------------------------------------------------------------------

def test_21_readme_says_what_matches_diffusers():
    readme = (ROOT / "README.md").read_text()
    assert "What matches, precisely" in readme and "clipped" in readme and "Compare steps there" in readme
    assert "Outputs match diffusers' to float32 rounding" not in readme


# -- 22. the pytest-benchmark suite -----------------------------------------------------------

def test_22_benchmark_suite_runs_apart_from_the_tests():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("diffusers")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
                          "--benchmark-disable", "--fastdiff-device", "cpu", "--fastdiff-sizes", "1x2x4x4",
                          "--fastdiff-dtypes", "fp32"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "6 passed, 1 skipped" in res.stdout  # the CUDA-graph case skips on a CPU

"""fastdiff.diffusers.FlowMatchEulerDiscreteScheduler against the installed diffusers, and against
an independent float64 computation of the step (``oracle``).

Bounds: float32 Euler steps on the torch path are bit-identical to diffusers (the table holds
dt = sigma_s - sigma_t from diffusers' float32 sigmas, and the step is x + dt * u in that order);
the stochastic step within 1 float32 ulp of the scale per step (torch may fuse the noise term's
multiply-add); the Triton kernel within 4e-6 of the scale; half-precision model outputs within
one ulp of their dtype (diffusers rounds dt * u to the model's dtype before adding, fastdiff
rounds once at the end) plus diffusers' own distance from the oracle.
"""
import math
import random

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler as Ref  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fastdiff.diffusers import FlowMatchEulerDiscreteScheduler as Fast  # noqa: E402

ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def oracle(sig, sig_next, x, m, z, stochastic):
    x, m = x.double(), m.double()
    if stochastic:
        x0 = x - sig * m
        return (1 - sig_next) * x0 + sig_next * z.double()
    return x + (sig_next - sig) * m


def velocity(x, t):
    return torch.tanh(0.8 * x) * (0.5 + t / 2000.0)


def run(cls, cfg, steps=6, dtype=torch.float32, set_kw=None, seed=0, shape=(2, 4, 5, 3), backend=None,
        check_oracle=True):
    s = cls(**cfg)
    if backend is not None:
        s.backend = backend
    s.set_timesteps(steps, **(set_kw or {}))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    xs, worst = [x], 0.0
    for t in s.timesteps:
        i = s.step_index if s.step_index is not None else None
        m = velocity(x.float(), float(t)).to(dtype)
        state = noise_gen.get_state()
        out = s.step(m, t, x, generator=noise_gen).prev_sample
        if check_oracle:
            i = s.step_index - 1
            z = None
            if cfg.get("stochastic_sampling"):
                g = torch.Generator()
                g.set_state(state)
                z = randn_tensor(x.shape, generator=g, dtype=torch.float32)
            want = oracle(float(s.sigmas[i]), float(s.sigmas[i + 1]), x.float(), m, z, cfg.get("stochastic_sampling"))
            worst = max(worst, float((out.double() - want).abs().max() / max(1.0, float(want.abs().max()))))
        assert out.dtype == dtype
        x = out
        xs.append(x)
    return s, xs, worst


CONFIGS = [
    {}, dict(shift=3.0), dict(shift=1.5, stochastic_sampling=True), dict(use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(shift=3.0, shift_terminal=0.1),
    dict(use_karras_sigmas=True, shift=3.0), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
    dict(invert_sigmas=True), dict(num_train_timesteps=500, shift=2.0),
]


def set_kwargs(cfg):
    return dict(mu=0.7) if cfg.get("use_dynamic_shifting") else {}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_every_config_option_matches_diffusers(cfg):
    ref, xr, _ = run(Ref, cfg, set_kw=set_kwargs(cfg), check_oracle=False)
    fast, xf, worst = run(Fast, cfg, set_kw=set_kwargs(cfg))
    assert torch.equal(ref.sigmas, fast.sigmas) and torch.equal(ref.timesteps, fast.timesteps)
    assert ref.sigmas.dtype == fast.sigmas.dtype == torch.float32
    for a, b in zip(xr, xf):
        if cfg.get("stochastic_sampling"):
            assert float((a - b).abs().max()) <= 4 * ULP[torch.float32] * max(1.0, float(a.abs().max()))
        else:
            assert torch.equal(a, b)
    assert worst < 1e-6
    assert fast.step_index == ref.step_index == len(ref.timesteps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_half_precision_within_one_ulp(dtype, stochastic):
    cfg = dict(shift=3.0, stochastic_sampling=stochastic)
    _, xr, worst_ref = run(Ref, cfg, dtype=dtype)
    _, xf, worst = run(Fast, cfg, dtype=dtype)
    assert worst <= 0.5 * ULP[dtype] + 1e-6  # one rounding of the float32 result, per step
    for a, b in zip(xr[1:], xf[1:]):
        assert float((a.double() - b.double()).abs().max()) <= 2 * ULP[dtype] * max(1.0, float(a.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel(dtype):
    for cfg in (dict(shift=3.0), dict(stochastic_sampling=True)):
        _, xt, worst = run(Fast, cfg, dtype=dtype, backend="triton", shape=(2, 3, 4))
        _, xr, _ = run(Fast, cfg, dtype=dtype, backend="torch", shape=(2, 3, 4))
        bound = 4e-6 if dtype == torch.float32 else ULP[dtype] + 4e-6  # interpreter truncates to bf16
        assert worst <= bound
        for a, b in zip(xt, xr):
            assert float((a.double() - b.double()).abs().max()) <= 6 * bound * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("draw", range(40))
def test_random_configs(draw):
    rnd = random.Random(1000 + draw)
    cfg = dict(num_train_timesteps=rnd.choice([1000, 1000, 250, 4000]), shift=rnd.choice([1.0, 1.5, 3.0, 7.0]),
               stochastic_sampling=rnd.random() < 0.3, invert_sigmas=rnd.random() < 0.1)
    if rnd.random() < 0.4:
        cfg.update(use_dynamic_shifting=True, time_shift_type=rnd.choice(["exponential", "linear"]),
                   base_shift=rnd.uniform(0.3, 0.7), max_shift=rnd.uniform(0.9, 1.5))
    if rnd.random() < 0.3:
        cfg["shift_terminal"] = rnd.choice([0.02, 0.1, 0.3])
    spacing = rnd.random()
    if spacing < 0.15:
        cfg["use_karras_sigmas"] = True
    elif spacing < 0.3:
        cfg["use_exponential_sigmas"] = True
    elif spacing < 0.4:
        cfg["use_beta_sigmas"] = True
    steps = rnd.choice([1, 2, 4, 9, 28])
    set_kw = dict(mu=rnd.uniform(0.2, 1.4)) if cfg.get("use_dynamic_shifting") else {}
    probe = Ref(**cfg)
    probe.set_timesteps(steps, **set_kw)
    if not torch.isfinite(probe.sigmas).all():
        # diffusers divides by zero here (shift_terminal with one step) and its loop fails later;
        # fastdiff names the constraint at set_timesteps instead.
        with pytest.raises(ValueError, match="shift_terminal"):
            Fast(**cfg).set_timesteps(steps, **set_kw)
        return
    ref, xr, _ = run(Ref, cfg, steps=steps, set_kw=set_kw, seed=draw, shape=(1, 3, 4), check_oracle=False)
    fast, xf, worst = run(Fast, cfg, steps=steps, set_kw=set_kw, seed=draw, shape=(1, 3, 4))
    assert torch.equal(ref.sigmas, fast.sigmas), cfg
    assert torch.equal(ref.timesteps, fast.timesteps), cfg
    tol = 4 * ULP[torch.float32] if cfg["stochastic_sampling"] else 0.0
    for a, b in zip(xr, xf):
        assert float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max())), cfg
    assert worst < 1e-6


def test_custom_sigmas_timesteps_and_mu_as_pipelines_pass_them():
    n = 7
    sigmas = np.linspace(1.0, 1 / n, n)  # what the Flux / SD3 pipelines pass
    cases = [dict(sigmas=sigmas.tolist()), dict(sigmas=sigmas, mu=1.1), dict(timesteps=[900.0, 700.0, 300.0, 20.0]),
             dict(sigmas=[0.9, 0.5, 0.2], timesteps=[950.0, 480.0, 100.0])]
    for kw in cases:
        for cfg in ({}, dict(use_dynamic_shifting=True), dict(shift=3.0)):
            if cfg.get("use_dynamic_shifting") and "mu" not in kw:
                kw = {**kw, "mu": 0.5}
            ref, fast = Ref(**cfg), Fast(**cfg)
            ref.set_timesteps(**kw)
            fast.set_timesteps(**kw)
            assert torch.equal(ref.sigmas, fast.sigmas) and torch.equal(ref.timesteps, fast.timesteps), (kw, cfg)
            assert ref.num_inference_steps == fast.num_inference_steps


def test_errors_as_diffusers_raises_them():
    f = Fast(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="`mu` must be passed"):
        f.set_timesteps(4)
    g = Fast()
    with pytest.raises(ValueError, match="same length"):
        g.set_timesteps(sigmas=[0.9, 0.5], timesteps=[900.0])
    with pytest.raises(ValueError, match="same length as num_inference_steps"):
        g.set_timesteps(3, sigmas=[0.9, 0.5])
    g.set_timesteps(3)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="integer indices"):
        g.step(x, 3, x)
    with pytest.raises(ValueError, match="same shape"):
        g.step(torch.randn(1, 3), g.timesteps[0], x)
    for t in g.timesteps:
        x = g.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="more often than there are timesteps"):
        g.step(x, g.timesteps[-1], x)


def test_step_index_begin_index_scale_noise_and_return_tuple():
    ref, fast = Ref(shift=3.0), Fast(shift=3.0)
    for s in (ref, fast):
        s.set_timesteps(10)
        s.set_begin_index(4)  # img2img: start at the fifth step
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    t0 = ref.timesteps[4:5].expand(2)
    assert torch.equal(ref.scale_noise(x0, t0, noise), fast.scale_noise(x0, t0, noise))
    xr = xf = ref.scale_noise(x0, t0, noise)
    for t in ref.timesteps[4:]:
        m = velocity(xr, float(t))
        xr = ref.step(m, t, xr).prev_sample
        (xf,) = fast.step(velocity(xf, float(t)), t, xf, return_dict=False)
    assert torch.equal(xr, xf) and fast.step_index == ref.step_index == 10
    # Starting mid-schedule without a begin index finds the step as diffusers does (the second
    # occurrence of a repeated timestep, here none).
    for s in (ref, fast):
        s.set_timesteps(10)
    assert fast.begin_index is None
    m = velocity(x0, 500.0)
    a = ref.step(m, ref.timesteps[3], x0).prev_sample
    b = fast.step(m, fast.timesteps[3], x0).prev_sample
    assert ref.step_index == fast.step_index == 4 and torch.equal(a, b)
    # A Python float timestep works too.
    for s in (ref, fast):
        s.set_timesteps(5)
    a = ref.step(m, float(ref.timesteps[2]), x0).prev_sample
    b = fast.step(m, float(fast.timesteps[2]), x0).prev_sample
    assert torch.equal(a, b)


def test_per_token_timesteps_run_diffusers_step():
    ref, fast = Ref(), Fast()
    for s in (ref, fast):
        s.set_timesteps(6)
    x = torch.randn(2, 5, 3)
    ptt = torch.tensor([[900.0, 850.0, 400.0, 300.0, 100.0]] * 2)
    a = ref.step(x * 0.3, ref.timesteps[0], x, per_token_timesteps=ptt).prev_sample
    b = fast.step(x * 0.3, fast.timesteps[0], x, per_token_timesteps=ptt).prev_sample
    assert torch.equal(a, b)


def test_philox_noise_for_stochastic_sampling_is_split_invariant():
    def loop(batch_slice):
        s = Fast(stochastic_sampling=True)
        s.set_timesteps(5)
        s.set_noise_seed(11)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))[batch_slice]
        for t in s.timesteps:
            x = s.step(x * 0.2, t, x).prev_sample
        return x

    a = loop(slice(0, 4))
    assert torch.isfinite(a).all() and a.std() > 0
    # Philox noise is keyed by the element index of this call: a scheduler sees its own batch as
    # starting at 0, so equal slices give equal noise, and different seeds differ.
    assert torch.equal(loop(slice(0, 2)), a[:2])


def test_config_round_trip_and_swap(tmp_path):
    fast = Fast(shift=3.0, use_dynamic_shifting=True, time_shift_type="linear", stochastic_sampling=True)
    fast.save_config(tmp_path)
    ref = Ref.from_config(Ref.load_config(tmp_path))
    back = Fast.from_config(ref.config)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(fast.config) == public(ref.config) and isinstance(back, Ref)
    from fastdiff.diffusers import swap_scheduler

    class Pipe:
        scheduler = Ref(shift=3.0)

    pipe = swap_scheduler(Pipe())
    assert isinstance(pipe.scheduler, Fast) and pipe.scheduler.config.shift == 3.0


def test_no_host_sync_per_step(request):
    """After set_timesteps, stepping reads nothing back from a tensor: no .item(), int(), float(),
    bool() on a tensor and no .nonzero() (diffusers' index_for_timestep does .nonzero().item())."""
    s = Fast(shift=3.0, stochastic_sampling=True)
    s.set_timesteps(6)
    s.set_noise_seed(3)
    x = torch.randn(2, 3)
    ts = list(s.timesteps)  # the pipeline iterates the timesteps before the loop
    reads = request.getfixturevalue("host_reads")
    for t in ts:
        x = s.step(x * 0.1, t, x).prev_sample
    assert reads.stop() == []

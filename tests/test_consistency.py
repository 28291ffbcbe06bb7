"""The multistep consistency sampler against an independent float64 computation (per step, from
the sampler's own inputs, on both backends and all dtypes), and consistency distillation on the
analytic test bed."""
import math

import numpy as np
import pytest
import torch

from fastdiff import ConsistencyDistillation, ConsistencySampler
from fastdiff.training.distill import MLPDenoiser
from fastdiff.engine.kernels import philox
from fastdiff.samplers import SAMPLERS, make_sampler
from fastdiff.testbed import GaussianMixture


def _linear_alpha_bar(n=1000, b0=1e-4, b1=0.02):
    return np.cumprod(1.0 - np.linspace(b0, b1, n))


class _Recording(torch.nn.Module):
    """A fixed nonlinear 'network' that keeps every output it returns (to rebuild each step)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def forward(self, x, t):
        out = 0.8 * torch.tanh(1.3 * x + 0.001 * t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))) - 0.1
        self.outputs.append(out.clone())
        return out


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_sampler_matches_float64_reference(backend, dtype, prediction_type):
    ab = _linear_alpha_bar()
    timesteps = [900, 610, 333, 120, 17]
    seed, offset = 1234, 3
    shape = (3, 5, 7)  # odd sizes
    s = ConsistencySampler(None, None, timesteps=timesteps, prediction_type=prediction_type, backend=backend)
    x_init = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    model = _Recording()
    seen = []
    out = s.sample(model, x=x_init, seed=seed, sample_offset=offset,
                   callback=lambda i, t, x: seen.append(x.clone()))
    assert out.dtype == dtype and len(seen) == len(timesteps)
    x = x_init.double()
    per_sample = math.prod(shape[1:])
    g = philox.global_indices(shape, offset * per_sample, torch.device("cpu"))
    for i, t in enumerate(timesteps):
        m = model.outputs[i].double()
        a_t, s_t = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        x0 = {"sample": m, "epsilon": (x - s_t * m) / a_t, "v_prediction": a_t * x - s_t * m}[prediction_type]
        if i + 1 < len(timesteps):
            ab_s = ab[timesteps[i + 1]]
            z = philox.normals_torch(torch.tensor(seed), g, torch.tensor(i), philox.STREAM_STEP).double()
            want = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * z
        else:
            want = x0
        got = seen[i].double()
        err = ((got - want).abs() / (1 + want.abs())).max()
        assert err <= TOL[dtype], (i, float(err))
        x = got  # the next step starts from what the sampler actually produced
    assert torch.equal(out, seen[-1])


def test_single_step_returns_the_x0_estimate_and_is_registered():
    assert SAMPLERS["consistency"] is ConsistencySampler
    s = make_sampler("consistency", None, 1, prediction_type="sample", timestep_spacing="trailing")
    assert list(s.timesteps) == [999]
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = s.sample(lambda x, t: 0.5 * x + 0.25, x=x, seed=0)
    assert torch.allclose(out, 0.5 * x + 0.25, rtol=0, atol=1e-6)


def test_consistency_distillation_learns_the_teacher_ode_endpoint():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: extra threads only contend
    try:
        _check_cd_on_mixture()
    finally:
        torch.set_num_threads(threads)


def _check_cd_on_mixture():
    torch.manual_seed(0)
    mix = GaussianMixture.random(dim=2, n_components=4, std_range=(0.05, 0.2), seed=1, schedule="squaredcos_cap_v2")

    def teacher(x, t):
        return mix.predict(x.double(), t, "v_prediction").float()

    student = MLPDenoiser(2, hidden=64)
    cd = ConsistencyDistillation(teacher, student, mix.schedule, teacher_prediction_type="v_prediction",
                                 student_prediction_type="v_prediction", grid_steps=8, batch_size=256, lr=3e-3,
                                 target_decay=0.9, seed=0)
    # The teacher's ODE endpoint from x_T: its own DDIM on the same 8-step grid, from the same noise.
    x_t = torch.randn(1000, 2, generator=torch.Generator().manual_seed(4))
    ode = make_sampler("ddim", mix.schedule, 8, prediction_type="v_prediction")
    end = ode.sample(teacher, x=x_t, seed=0).double()
    one = cd.sampler(1)

    def err():
        with torch.no_grad():
            return float((one.sample(student.eval(), x=x_t, seed=0).double() - end).square().sum(1).mean())

    before = err()
    cd.fit(lambda n, g: mix.sample_x0(n, g).float(), 300)
    after = err()
    assert after < 0.2 * before, (before, after)
    # The target network trails the student by the EMA; its parameters differ but stay close.
    d = sum(float((a - b).detach().abs().max()) for a, b in zip(cd.target.parameters(), student.parameters()))
    assert 0 < d < 1.0


def test_target_network_is_an_ema_of_the_student():
    student = MLPDenoiser(2, hidden=8)
    cd = ConsistencyDistillation(lambda x, t: torch.zeros_like(x), student, None, student_prediction_type="sample",
                                 teacher_prediction_type="epsilon", grid_steps=4, target_decay=0.75, batch_size=16,
                                 lr=1e-2, seed=0)
    old_target = [p.detach().clone() for p in cd.target.parameters()]
    cd.train_step(torch.randn(32, 2))
    for p_t, p_old, p_s in zip(cd.target.parameters(), old_target, student.parameters()):
        want = 0.75 * p_old.double() + 0.25 * p_s.detach().double()
        assert torch.allclose(p_t.double(), want, rtol=0, atol=1e-6)


def test_resume_matches_uninterrupted(tmp_path):
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def trainer():
        torch.manual_seed(3)
        return ConsistencyDistillation(lambda x, t: 0.5 * x, MLPDenoiser(2, hidden=16), None,
                                       teacher_prediction_type="epsilon", student_prediction_type="sample",
                                       grid_steps=5, batch_size=16, lr=1e-3, seed=1)

    full = trainer()
    full.fit(data, 9)
    path = str(tmp_path / "cd.pt")
    part = trainer()
    part.fit(data, 4, state_path=path)
    resumed = trainer().load(path)
    assert resumed.iteration == 4
    resumed.fit(data, 9)
    for a, b in zip(full.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.target.state_dict().values(), resumed.target.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, match", [
    ({"grid_steps": 1}, "grid_steps must be an int >= 2"),
    ({"target_decay": 1.0}, "target_decay must lie in"),
    ({"distance": "l1"}, "distance must be one of"),
    ({"weighting": "bogus"}, "weighting must be one of"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyDistillation(lambda x, t: x, MLPDenoiser(2), None, **kw)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ConsistencySampler(None, 4, prediction_type="x0")
    with pytest.raises(ValueError, match="must not exceed num_train_timesteps"):
        ConsistencySampler(None, 2000)

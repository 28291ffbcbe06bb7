"""Progressive distillation on the analytic test bed: the target construction against an
independent float64 computation of two teacher DDIM steps, the trained student against the
same, resuming from a state file, and argument checks."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.training.distill import MLPDenoiser, ProgressiveDistillation
from fastdiff.testbed import GaussianMixture, frechet_distance, sliced_wasserstein


def _mixture():
    return GaussianMixture.random(dim=2, n_components=4, std_range=(0.05, 0.2), seed=1, schedule="squaredcos_cap_v2")


class _F32(torch.nn.Module):
    """The exact mixture network, evaluated in float64 and returned in the input's dtype."""

    def __init__(self, mixture, prediction_type):
        super().__init__()
        self.mixture, self.prediction_type = mixture, prediction_type

    def forward(self, x, t):
        return self.mixture.predict(x.double(), t, self.prediction_type).to(x.dtype)


def _cosine_alpha_bar(n=1000):
    # Nichol & Dhariwal's cosine schedule written out here, independently of fastdiff._C.
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    return np.cumprod(1.0 - betas)


def _two_teacher_steps_f64(mixture, x, t, t_mid, t_end, ab):
    """z_t'' from z_t by two deterministic DDIM steps with the exact posterior mean, float64."""
    def step(x, t_from, t_to):
        a_t = math.sqrt(ab[t_from])
        x0 = mixture.x0_mean(x, torch.full((x.shape[0],), t_from))
        eps = (x - a_t * x0) / math.sqrt(1 - ab[t_from])
        ab_to = 1.0 if t_to < 0 else ab[t_to]
        return math.sqrt(ab_to) * x0 + math.sqrt(1 - ab_to) * eps
    return step(step(x, t, t_mid), t_mid, t_end)


def _student_one_step_f64(model, x, t, t_end, ab):
    out = model(x.float(), torch.full((x.shape[0],), t)).double()
    a_t, s_t = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
    x0 = a_t * x - s_t * out  # v-prediction
    eps = a_t * out + s_t * x
    ab_to = 1.0 if t_end < 0 else ab[t_end]
    return math.sqrt(ab_to) * x0 + math.sqrt(1 - ab_to) * eps


def test_targets_make_one_step_land_on_two_teacher_steps():
    mix = _mixture()
    ab = _cosine_alpha_bar()
    pd = ProgressiveDistillation(_F32(mix, "v_prediction"), MLPDenoiser(2), mix.schedule,
                                 teacher_prediction_type="v_prediction", teacher_steps=8, final_steps=2, seed=3)
    ts = pd.teacher_grid.timesteps
    assert len(ts) == 8 and pd.student_steps == 4
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        t, t_mid, t_end = int(ts[2 * i]), int(ts[2 * i + 1]), (int(ts[2 * i + 2]) if 2 * i + 2 < 8 else -1)
        x = mix.sample_xt(64, t, g)[1]
        target = pd.targets(x.float(), torch.full((64,), i)).double()
        want = _two_teacher_steps_f64(mix, x, t, t_mid, t_end, ab)
        # One DDIM step t -> t'' with x0_hat = target: eps_hat = (x - a_t x0) / s_t.
        a_t, s_t = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
        ab_to = 1.0 if t_end < 0 else ab[t_end]
        landed = math.sqrt(ab_to) * target + math.sqrt(1 - ab_to) * (x - a_t * target) / s_t
        scale = want.abs().max()
        assert (landed - want).abs().max() <= 2e-5 * (1 + scale), (i, float((landed - want).abs().max()))


def _one_round_error(model, mix, ts, ab, n=512, seed=11):
    """Mean squared distance between one student step and two exact teacher steps on the 2-step grid."""
    g = torch.Generator().manual_seed(seed)
    errs = []
    for i in range(len(ts) // 2):
        t, t_mid, t_end = int(ts[2 * i]), int(ts[2 * i + 1]), (int(ts[2 * i + 2]) if 2 * i + 2 < len(ts) else -1)
        x = mix.sample_xt(n, t, g)[1]
        with torch.no_grad():
            got = _student_one_step_f64(model, x, t, t_end, ab)
        want = _two_teacher_steps_f64(mix, x, t, t_mid, t_end, ab)
        errs.append(float((got - want).square().sum(1).mean()))
    return float(np.mean(errs))


@pytest.fixture
def one_thread():
    # The networks here are tiny: extra threads only add synchronisation (and contend with other
    # test processes on a 2-core CI machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_distillation_reduces_error_against_two_teacher_steps(one_thread):
    """One round (4 -> 2 steps) from the exact teacher: the student's single step ends much closer
    to two teacher steps than before training, and closer than the teacher's own single step."""
    torch.manual_seed(0)
    mix = _mixture()
    ab = _cosine_alpha_bar()
    teacher = _F32(mix, "v_prediction")
    student = MLPDenoiser(2, hidden=64)
    pd = ProgressiveDistillation(teacher, student, mix.schedule, teacher_prediction_type="v_prediction",
                                 teacher_steps=4, final_steps=2, iters_per_round=300, batch_size=256, lr=3e-3, seed=0)
    ts = pd.teacher_grid.timesteps
    before = _one_round_error(student, mix, ts, ab)
    teacher_one = _one_round_error(teacher, mix, ts, ab)
    pd.fit(lambda n, g: mix.sample_x0(n, g).float())
    assert pd.done and [h["steps"] for h in pd.history] == [2]
    after = _one_round_error(student, mix, ts, ab)
    print(f"one-step error vs two teacher steps: untrained {before:.4g}, teacher {teacher_one:.4g}, student {after:.4g}")
    assert after < 0.1 * before, (before, after)
    assert after < 0.5 * teacher_one, (teacher_one, after)


def test_distilled_two_step_student_beats_ddim_on_the_mixture(one_thread):
    """8 -> 4 -> 2 steps: the 2-step student samples the mixture better than 2-step DDIM with the
    exact network (Frechet distance and sliced Wasserstein against exact samples)."""
    torch.manual_seed(0)
    mix = _mixture()
    teacher = _F32(mix, "v_prediction")
    student = MLPDenoiser(2, hidden=64)
    pd = ProgressiveDistillation(teacher, student, mix.schedule, teacher_prediction_type="v_prediction",
                                 teacher_steps=8, final_steps=2, iters_per_round=250, batch_size=256, lr=3e-3, seed=0)
    pd.fit(lambda n, g: mix.sample_x0(n, g).float())
    ref = mix.sample_x0(3000, torch.Generator().manual_seed(5)).float()
    with torch.no_grad():
        x_ddim = fastdiff.sample(teacher, (3000, 2), sampler="ddim", steps=2, schedule=mix.schedule,
                                 prediction_type="v_prediction", seed=1)
        x_student = pd.sampler().sample(student.eval(), (3000, 2), seed=1)
    fd_ddim, fd_student = frechet_distance(x_ddim, ref), frechet_distance(x_student, ref)
    sw_ddim, sw_student = sliced_wasserstein(x_ddim, ref), sliced_wasserstein(x_student, ref)
    print(f"2 steps: FD ddim {fd_ddim:.4g} student {fd_student:.4g}; SW ddim {sw_ddim:.4g} student {sw_student:.4g}")
    assert fd_student < 0.5 * fd_ddim, (fd_ddim, fd_student)
    assert sw_student < sw_ddim, (sw_ddim, sw_student)


def test_resume_from_state_file_matches_an_uninterrupted_run(tmp_path):
    mix = _mixture()
    data = lambda n, g: mix.sample_x0(n, g).float()  # noqa: E731

    def trainer():
        torch.manual_seed(7)
        return ProgressiveDistillation(_F32(mix, "v_prediction"), MLPDenoiser(2, hidden=32), mix.schedule,
                                       teacher_prediction_type="v_prediction", teacher_steps=4, final_steps=1,
                                       iters_per_round=6, batch_size=32, lr=1e-3, seed=2)

    full = trainer()
    full.fit(data)
    path = str(tmp_path / "pd.pt")
    first = trainer()
    first.fit(data, state_path=path, max_iters=8)  # stops inside round 1 (6 + 2 iterations)
    assert (first.round, first.iteration) == (1, 2)
    resumed = trainer().load(path)
    assert (resumed.round, resumed.iteration, resumed.student_steps) == (1, 2, 1)
    resumed.fit(data)
    assert resumed.done
    for (name, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["steps"] for h in resumed.history] == [2, 1, 1]


def test_sampler_runs_the_student_on_its_grid():
    mix = _mixture()
    pd = ProgressiveDistillation(_F32(mix, "v_prediction"), MLPDenoiser(2), mix.schedule,
                                 teacher_prediction_type="v_prediction", teacher_steps=16, final_steps=4)
    assert pd.rounds == 2
    s = pd.sampler()
    assert s.steps == 8 and list(s.timesteps) == list(pd.teacher_grid.timesteps[::2])
    assert s.prediction_type == "v_prediction"


@pytest.mark.parametrize("kw, match", [
    ({"teacher_steps": 12, "final_steps": 2}, "power of two"),
    ({"teacher_steps": 4, "final_steps": 4}, "must be smaller"),
    ({"teacher_steps": 1}, "teacher_steps must be an int >= 2"),
    ({"weighting": "snr"}, "weighting must be one of"),
    ({"student_prediction_type": "x0"}, "student_prediction_type must be one of"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"lr": -1.0}, "lr must be"),
])
def test_bad_arguments_name_the_constraint(kw, match):
    mix = _mixture()
    with pytest.raises(ValueError, match=match):
        ProgressiveDistillation(_F32(mix, "v_prediction"), MLPDenoiser(2), mix.schedule,
                                teacher_prediction_type="v_prediction", **kw)


def test_bad_teacher_student_and_data():
    mix = _mixture()
    with pytest.raises(TypeError, match="teacher must be callable"):
        ProgressiveDistillation(3, MLPDenoiser(2), mix.schedule)
    with pytest.raises(ValueError, match="student is required"):
        ProgressiveDistillation(lambda x, t: x, None, mix.schedule)
    with pytest.raises(ValueError, match="must read its output the same way"):
        ProgressiveDistillation(MLPDenoiser(2), None, mix.schedule, teacher_prediction_type="epsilon",
                                student_prediction_type="v_prediction")
    pd = ProgressiveDistillation(_F32(mix, "v_prediction"), MLPDenoiser(2), mix.schedule, teacher_steps=4,
                                 teacher_prediction_type="v_prediction", batch_size=8)
    with pytest.raises(ValueError, match="must be a \\[N, ...\\] tensor"):
        pd.fit(torch.zeros(0, 2))
    with pytest.raises(TypeError, match="data must be a tensor or a callable"):
        pd.fit([1, 2, 3])
    with pytest.raises(ValueError, match="must return a tensor with 8 rows"):
        pd.fit(lambda n, g: torch.zeros(3, 2))


def test_student_copied_from_a_frozen_teacher_trains_and_the_teacher_stays():
    torch.manual_seed(0)
    teacher = MLPDenoiser(2, hidden=16).eval().requires_grad_(False)  # as loaded for inference
    before = [p.clone() for p in teacher.parameters()]
    pd = ProgressiveDistillation(teacher, None, None, teacher_prediction_type="v_prediction", teacher_steps=4,
                                 final_steps=2, iters_per_round=3, batch_size=8, lr=1e-2)
    assert pd.student is not teacher
    pd.fit(torch.randn(32, 2))
    assert any(not torch.equal(a, b) for a, b in zip(pd.student.parameters(), before))
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before))


def test_loss_weightings_by_hand():
    """max(SNR, 1), SNR + 1 and 1 at a high-SNR and a low-SNR point (Salimans & Ho, 2022, sec. 4)."""
    from fastdiff.training.distill import loss_weight
    alpha = torch.tensor([0.9, 0.2], dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    snr = alpha ** 2 / sigma ** 2  # 4.263..., 0.0416...
    torch.testing.assert_close(loss_weight(alpha, sigma, "truncated_snr"), torch.stack([snr[0], torch.tensor(1.0, dtype=torch.float64)]))
    torch.testing.assert_close(loss_weight(alpha, sigma, "snr+1"), snr + 1)
    torch.testing.assert_close(loss_weight(alpha, sigma, "uniform"), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="weighting must be one of"):
        loss_weight(alpha, sigma, "snr")

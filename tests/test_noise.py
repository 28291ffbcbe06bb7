"""In-kernel Philox noise: determinism, independence from block/grid/batch split, and statistics.

Statistical bounds are 5 standard errors for the sample size used (false-alarm rate ~1e-6 per
check with the fixed seeds here, and a real defect such as a repeated or correlated stream moves
the statistic far past them)."""
import math

import pytest
import torch

from fastdiff.engine.kernels import philox
from fastdiff.engine.step import step as vp_step
from fastdiff.samplers import DDPMSampler

N = 1 << 18


def kernel_noise(shape, seed, step=0, stream=philox.STREAM_STEP, index_offset=0):
    return philox.randn(shape, seed, step=step, stream=stream, index_offset=index_offset, backend="triton")


def test_same_seed_same_bits_and_torch_agrees():
    a = kernel_noise((3, 1001), 7)
    b = kernel_noise((3, 1001), 7)
    assert torch.equal(a, b)
    c = philox.randn((3, 1001), 7, stream=philox.STREAM_STEP, backend="torch")
    # same 32-bit words; normals differ only by float32 rounding of log/cos/sin
    torch.testing.assert_close(a, c, rtol=0, atol=2e-6)


def test_independent_of_block_size_and_grid():
    n = 5000
    seed = torch.tensor([99])
    outs = []
    for block in (64, 256, 8192):
        out = torch.empty(n)
        grid = (math.ceil((n + 1) / block),)
        # global offset 1 -> shift 1: the lanes of a Philox call straddle the program boundary
        philox._randn_kernel[grid](out, seed, n, 0, 3, 0, BLOCK=block, SHIFT=1)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert torch.equal(outs[0], kernel_noise((n,), 99, step=3, index_offset=1))


def test_batch_split_gives_the_same_noise():
    shape = (6, 3, 5)  # 15 elements per sample: splits land mid Philox group
    whole = kernel_noise(shape, 5)
    for cut in (1, 2, 3, 5):
        a = kernel_noise((cut, 3, 5), 5)
        b = kernel_noise((6 - cut, 3, 5), 5, index_offset=cut * 15)
        assert torch.equal(torch.cat([a, b]), whole)


def test_step_kernel_noise_batch_split():
    sampler = DDPMSampler(steps=4)
    table, _, ids = sampler.device_state("cpu")
    gen = torch.Generator().manual_seed(0)
    x, m = torch.randn(5, 7, 3, generator=gen), torch.randn(5, 7, 3, generator=gen)
    seed = torch.tensor([123])
    whole = vp_step(x, m, table, ids[1], seed=seed, backend="triton")
    a = vp_step(x[:2], m[:2], table, ids[1], seed=seed, sample_offset=0, backend="triton")
    b = vp_step(x[2:], m[2:], table, ids[1], seed=seed, sample_offset=2, backend="triton")
    assert torch.equal(torch.cat([a, b]), whole)


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).mean() / (a.std() * b.std()))


def test_moments_and_tails():
    z = kernel_noise((N,), 2024).double()
    se = 1 / math.sqrt(N)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / N)
    kurt = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / N)
    # tail mass at the 2.5% / 97.5% quantiles of N(0, 1)
    p = 0.025
    for frac in (float((z < -1.959964).double().mean()), float((z > 1.959964).double().mean())):
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_no_correlation_between_neighbours_steps_seeds_streams():
    bound = 5 / math.sqrt(N)
    z = kernel_noise((N,), 11)
    for lag in (1, 2, 3, 4, 5, 8):  # lags 1-3 share a Philox call, 4 and 8 share a lane
        assert abs(_corr(z[:-lag], z[lag:])) < bound, lag
    # the four lanes of a call, pairwise (cos/sin of one Box-Muller pair included)
    lanes = z.view(-1, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_corr(lanes[:, i], lanes[:, j])) < 2 * bound
    for other in (kernel_noise((N,), 11, step=1), kernel_noise((N,), 12),
                  kernel_noise((N,), 11, stream=philox.STREAM_INIT), kernel_noise((N,), 11 + 2**32)):
        assert abs(_corr(z, other)) < bound
        assert not torch.equal(z, other)


def test_squares_have_unit_mean_per_lane():
    """Each lane alone is N(0, 1): E[z^2] = 1 for lanes 0..3 separately."""
    z = kernel_noise((N,), 3).double().view(-1, 4)
    for j in range(4):
        assert abs(float((z[:, j] ** 2).mean()) - 1) < 5 * math.sqrt(2 / (N / 4))


def test_randn_errors():
    with pytest.raises(ValueError, match=r"index_offset must be an int in \[0, 2\*\*62\)"):
        philox.randn((3,), 1, index_offset=-2)
    with pytest.raises(ValueError, match="dtype must be a floating type"):
        philox.randn((3,), 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be contiguous"):
        philox.randn(None, 1, out=torch.empty(4, 4).t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_randn_dtypes(dtype):
    a = philox.randn((4, 9), 3, dtype=dtype, backend="triton")
    b = philox.randn((4, 9), 3, dtype=torch.float32, backend="torch")
    assert a.dtype == dtype
    torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


def test_range_generator_equals_per_index_generator():
    seed = torch.tensor(2**40 + 17)
    for start, n in ((0, 1), (3, 10), (5, 4), (2**33 + 1, 37), (6, 3 * philox._TORCH_CHUNK // 2 + 5)):
        g = torch.arange(start, start + n, dtype=torch.int64)
        torch.testing.assert_close(philox.normals_range(seed, start, n, 6, 0, "cpu"),
                                   philox.normals_torch(seed, g, 6, 0), rtol=0, atol=0)

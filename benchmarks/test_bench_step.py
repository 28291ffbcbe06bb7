"""One sampler step as a pytest-benchmark suite: fastdiff's fused step, the same update as eager
torch ops, and diffusers' DDIMScheduler.step, in one group per size and dtype. The table with
bandwidth against a device copy is benchmarks/bench_step.py; this suite is for
--benchmark-save / --benchmark-compare (benchmarks/conftest.py).

    python -m pytest benchmarks/test_bench_step.py --benchmark-only
"""
from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff.engine.step import step

STEPS, ROW = 50, 10  # DDIM over 50 leading timesteps, the update of step 10


@pytest.fixture(scope="module")
def ddim():
    return fastdiff.DDIMSampler(steps=STEPS, eta=0.0, timestep_spacing="leading")


def _inputs(shape, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    m = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return x, m


def _group(bench, shape, dtype_name, x):
    n = math.prod(shape)
    bench.group = f"step {'x'.join(map(str, shape))} {dtype_name}"
    bench.extra_info.update(elements=n, bytes_moved=3 * n * x.element_size())  # read x_t, model output; write x_s


def test_fastdiff_fused_step(bench, ddim, shape, dtype, dtype_name, device):
    table, _, ids = ddim.device_state(device)
    x, m = _inputs(shape, device, dtype)
    out = torch.empty_like(x)
    backend = "triton" if device.type == "cuda" else "torch"
    _group(bench, shape, dtype_name, x)
    bench.extra_info["backend"] = backend
    bench(lambda: step(x, m, table, ids[ROW], out=out, backend=backend))


def test_eager_torch_ops(bench, ddim, shape, dtype, dtype_name, device):
    row = ddim.table.host[ROW]
    a_t, b_t, c_x0, c_eps = (float(row[fastdiff.COLUMNS.index(k)]) for k in ("a_t", "b_t", "c_x0", "c_eps"))
    x, m = _inputs(shape, device, dtype)
    out = torch.empty_like(x)
    _group(bench, shape, dtype_name, x)
    bench(lambda: torch.add(c_x0 * ((x - b_t * m) / a_t), c_eps * m, out=out))


def test_diffusers_ddim_step(bench, shape, dtype, dtype_name, device):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(STEPS, device=device)
    t = sched.timesteps[ROW]
    x, m = _inputs(shape, device, dtype)
    _group(bench, shape, dtype_name, x)
    bench(lambda: sched.step(m, t, x))

"""A whole sampling loop (20 DDIM steps, a model that costs one elementwise op, so the sampler's
own cost shows) as a pytest-benchmark suite, one group per size and dtype: fastdiff's sampler
(eager, and as one CUDA graph on a GPU), fastdiff's diffusers drop-in in diffusers' loop, and
diffusers' own DDIMScheduler. The sampler-overhead tables are benchmarks/bench_gpu_loop.py and
bench_overhead.py; this suite is for --benchmark-save / --benchmark-compare.

    python -m pytest benchmarks/test_bench_loop.py --benchmark-only
"""
from __future__ import annotations

import math

import pytest
import torch

import fastdiff

STEPS = 20


def model(x, t):
    return x * 0.5


def _group(bench, shape, dtype_name):
    bench.group = f"loop {STEPS} steps {'x'.join(map(str, shape))} {dtype_name}"
    bench.extra_info.update(elements=math.prod(shape), steps=STEPS)


def test_fastdiff_sampler(bench, shape, dtype, dtype_name, device):
    sampler = fastdiff.DDIMSampler(steps=STEPS)
    _group(bench, shape, dtype_name)
    bench(lambda: sampler.sample(model, shape, seed=0, device=device, dtype=dtype))


def test_fastdiff_sampler_cuda_graph(bench, shape, dtype, dtype_name, device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    sampler = fastdiff.DDIMSampler(steps=STEPS)
    runner = fastdiff.GraphedSampler(sampler, model)
    runner(shape, seed=0, device=device, dtype=dtype)  # capture once, outside the timing
    _group(bench, shape, dtype_name)
    bench(lambda: runner(shape, seed=0, device=device, dtype=dtype))


def _diffusers_loop(sched, shape, device, dtype):
    sched.set_timesteps(STEPS, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        return x

    return run


def test_fastdiff_dropin_in_diffusers_loop(bench, shape, dtype, dtype_name, device):
    pytest.importorskip("diffusers")
    from fastdiff.diffusers import DDIMScheduler

    _group(bench, shape, dtype_name)
    bench(_diffusers_loop(DDIMScheduler(num_train_timesteps=1000), shape, device, dtype))


def test_diffusers_scheduler_loop(bench, shape, dtype, dtype_name, device):
    diffusers = pytest.importorskip("diffusers")
    _group(bench, shape, dtype_name)
    bench(_diffusers_loop(diffusers.DDIMScheduler(num_train_timesteps=1000), shape, device, dtype))

"""pytest-benchmark set-up for benchmarks/test_*.py (not collected by the test run: pyproject's
testpaths is tests/ only).

    python -m pytest benchmarks --benchmark-only                          # CUDA if present, else CPU
    python -m pytest benchmarks --benchmark-only --benchmark-save=base    # keep a run (.benchmarks/)
    python -m pytest benchmarks --benchmark-only --benchmark-compare      # against the last kept run
    python -m pytest benchmarks --benchmark-only --fastdiff-dtypes fp32,bf16 --fastdiff-device cuda

Each group is one size and dtype, holding fastdiff, eager torch and diffusers, so the table and
--benchmark-compare line them up. Saved runs record the machine (pytest-benchmark's), the git
commit and date (pytest-benchmark's), and the device and torch / triton / diffusers / fastdiff
versions (added here). On CUDA every timed loop ends in a synchronisation (see ``bench``).
"""
from __future__ import annotations

import time

import pytest
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Latent-diffusion sizes on a GPU (4-channel 64x64 and 128x128 latents, batch 16: 256 K, 1 M and
# 4 M elements); on a CPU the two smaller ones, where a step takes milliseconds.
SIZES = {"cuda": ["1x4x64x64", "16x4x64x64", "16x4x128x128", "16x4x256x256"], "cpu": ["1x4x64x64", "16x4x64x64"]}


def pytest_addoption(parser):
    g = parser.getgroup("fastdiff benchmarks")
    g.addoption("--fastdiff-device", default=None, help="cuda or cpu (default: cuda when available)")
    g.addoption("--fastdiff-dtypes", default=None, help="comma list of fp32, fp16, bf16 (default: all three on "
                                                        "CUDA, fp32 on the CPU)")
    g.addoption("--fastdiff-sizes", default=None, help="comma list such as 1x4x64x64,16x4x64x64")


def bench_device(config) -> torch.device:
    name = config.getoption("--fastdiff-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = bench_device(config)
    if "size" in metafunc.fixturenames:
        text = config.getoption("--fastdiff-sizes")
        sizes = text.split(",") if text else SIZES["cuda" if device.type == "cuda" else "cpu"]
        metafunc.parametrize("size", [s.strip() for s in sizes if s.strip()])
    if "dtype_name" in metafunc.fixturenames:
        text = config.getoption("--fastdiff-dtypes")
        names = [d.strip() for d in text.split(",")] if text else (list(DTYPES) if device.type == "cuda" else ["fp32"])
        bad = [d for d in names if d not in DTYPES]
        if bad:
            raise pytest.UsageError(f"--fastdiff-dtypes must be chosen from {sorted(DTYPES)}, got {bad}")
        metafunc.parametrize("dtype_name", names)


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):
        skip = pytest.mark.skip(reason="needs pytest-benchmark (pip install '.[bench]')")
        for item in items:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastdiff

    device = bench_device(config)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "fastdiff": fastdiff.__version__}
    for mod in ("triton", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "absent"
    machine_info["fastdiff_bench"] = info


@pytest.fixture
def device(request) -> torch.device:
    d = bench_device(request.config)
    if d.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--fastdiff-device cuda: torch sees no CUDA device")
    return d


@pytest.fixture
def shape(size):
    return tuple(int(s) for s in size.split("x"))


@pytest.fixture
def dtype(dtype_name):
    return DTYPES[dtype_name]


def _synced_perf_counter() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


@pytest.fixture
def bench(benchmark, device):
    """pytest-benchmark's fixture; on CUDA its timer synchronises, so that a timed loop of calls
    (pytest-benchmark reads the timer before and after each loop, never inside) measures the
    device work of the loop rather than the launches queued. pytest-benchmark has no public
    setting for a per-fixture timer (--benchmark-timer takes a module path), hence the attribute."""
    if device.type == "cuda":
        benchmark._timer = _synced_perf_counter
    return benchmark

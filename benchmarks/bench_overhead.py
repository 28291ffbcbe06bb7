"""Eager Python cost of one step call, with the kernel launch stubbed out (what the loop pays per
step on top of the kernel itself). CPU only; prints microseconds per call, best of 7 runs of 2000.

    python benchmarks/bench_overhead.py

Figures (2-core VM, torch 2.13 CPU, triton 3.9, one thread) are in benchmarks/RESULTS.md.
"""
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend resolves on CPU tensors

import torch  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.engine.kernels import fused_step  # noqa: E402


class _StubKernel:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def best(f, n=2000, repeats=7):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)


def main():
    torch.set_num_threads(1)
    fused_step._fused_step_kernel = _StubKernel()
    x = torch.randn(2, 4, 16, 16)
    m = torch.randn_like(x)
    s = fastdiff.DDPMSampler(steps=10, backend="triton")
    table, _, ids = s.device_state(x.device)
    seed = torch.tensor([3])
    opts = s.options
    print(f"fastdiff.step, Table + StepOptions (the samplers' call): "
          f"{best(lambda: fastdiff.step(x, m, s.table, ids[3], opts, seed=seed, out=x)):.2f} us")
    print(f"fastdiff.step, tensor table + option keywords:           "
          f"{best(lambda: fastdiff.step(x, m, table, ids[3], seed=seed, out=x, backend='triton')):.2f} us")


if __name__ == "__main__":
    main()

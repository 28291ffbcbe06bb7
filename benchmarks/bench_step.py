"""Microbenchmark of one sampler step: fastdiff's fused step vs the same update as separate eager
torch ops vs diffusers' DDIMScheduler.step, against a measured device-to-device copy.

    python benchmarks/bench_step.py                # GPU if present (Triton path), else CPU (torch path)
    python benchmarks/bench_step.py --quick        # three sizes, fp32 only
    python benchmarks/bench_step.py --max-elements 4194304 --dtypes fp16

Bytes a step must move (its floor, invariant 4 of docs/design.md): read x_t and the model output, write
x_s; in-kernel noise adds no traffic. GB/s counts those bytes; "% copy" divides by the bandwidth
of `dst.copy_(src)` on the same device and dtype (bytes read + written), measured in the same run.
Times are medians of many repeats after warm-up (CUDA events through triton.testing.do_bench on
GPU; perf_counter over repeated calls on CPU).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.engine.step import step as vp_step

SIZES = [
    ("1x4x64x64", (1, 4, 64, 64)),
    ("16x4x64x64", (16, 4, 64, 64)),
    ("16x4x128x128", (16, 4, 128, 128)),
    ("4M", (16, 4, 256, 256)),
    ("16M", (64, 4, 256, 256)),
    ("64M", (256, 4, 256, 256)),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bench(fn, device, min_time=0.2):
    """Median seconds per call."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=max(50, int(min_time * 1000)), return_mode="median") / 1e3
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def header(device) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "absent"
    try:
        import diffusers
        dv = diffusers.__version__
    except Exception:
        dv = "absent"
    return (f"device: {dev} | torch {torch.__version__} | triton {tv} | diffusers {dv} | python "
            f"{platform.python_version()} | fastdiff {fastdiff.__version__} @ {commit()} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def run(sizes, dtypes, device, with_diffusers=True, min_time=0.2, out=sys.stdout):
    steps = 50
    ddim = fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading")
    ddpm = fastdiff.DDPMSampler(steps=steps, timestep_spacing="leading")
    table, ts, ids = ddim.device_state(device)
    ptable, _, pids = ddpm.device_state(device)
    i = 10
    step_id, pstep_id = ids[i], pids[i]
    seed = torch.tensor([0], device=device)
    tab64 = ddim.table.host[i]
    a_t, s_t, c_x0, c_eps = (float(tab64[fastdiff.COLUMNS.index(k)]) for k in ("a_t", "b_t", "c_x0", "c_eps"))
    sched = None
    if with_diffusers:
        try:
            from diffusers import DDIMScheduler
            sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
            sched.set_timesteps(steps)
            t_diff = sched.timesteps[i]
        except ImportError:
            sched = None
    backend = "triton" if device.type == "cuda" else "torch"
    print(header(device), file=out)
    print(f"path: {backend}; step {i} of {steps}; ddim eta=0 unless noted", file=out)
    cols = f"| {'size':>13} | {'elements':>10} | {'dtype':>5} | {'op':<24} | {'time':>10} | {'GB/s':>8} | {'% copy':>6} |"
    print(cols, file=out)
    print("|" + "|".join("-" * (len(c) - 0) for c in cols.split("|")[1:-1]) + "|", file=out)
    rows = []
    for name, shape in sizes:
        n = 1
        for s in shape:
            n *= s
        for dname in dtypes:
            dt = DTYPES[dname]
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, generator=gen, device=device, dtype=dt)
            m = torch.randn(shape, generator=gen, device=device, dtype=dt)
            out_t = torch.empty_like(x)
            esz = x.element_size()
            step_bytes = 3 * n * esz
            copy_s = bench(lambda: out_t.copy_(x), device, min_time)
            copy_bw = 2 * n * esz / copy_s
            cases = [
                ("copy (x -> out)", lambda: out_t.copy_(x), 2 * n * esz),
                ("fastdiff fused ddim", lambda: vp_step(x, m, table, step_id, out=out_t, backend=backend), step_bytes),
                ("fastdiff fused ddpm+noise", lambda: vp_step(x, m, ptable, pstep_id, seed=seed, out=out_t,
                                                              backend=backend), step_bytes),
                ("eager torch ops ddim", lambda: torch.add(c_x0 * ((x - s_t * m) / a_t), c_eps * m, out=out_t),
                 step_bytes),
            ]
            if sched is not None:
                cases.append(("diffusers DDIM step", lambda: sched.step(m, t_diff, x), step_bytes))
            for op, fn, nbytes in cases:
                sec = bench(fn, device, min_time)
                bw = nbytes / sec
                rows.append(dict(size=name, n=n, dtype=dname, op=op, sec=sec, gbps=bw / 1e9, pct=100 * bw / copy_bw))
                r = rows[-1]
                print(f"| {name:>13} | {n:>10} | {dname:>5} | {op:<24} | {fmt_time(sec):>10} | {r['gbps']:>8.1f} | "
                      f"{r['pct']:>5.0f}% |", file=out, flush=True)
            if sched is not None:
                f = next(r for r in rows[::-1] if r["op"] == "fastdiff fused ddim")
                d = next(r for r in rows[::-1] if r["op"] == "diffusers DDIM step")
                print(f"| {'':>13} | {'':>10} | {'':>5} | {'speedup vs diffusers':<24} | {d['sec'] / f['sec']:>9.1f}x | "
                      f"{'':>8} | {'':>6} |", file=out)
            del x, m, out_t
    return rows


def fmt_time(sec):
    return f"{sec * 1e6:.1f} us" if sec < 1e-2 else f"{sec * 1e3:.2f} ms"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--max-elements", type=int, default=None, help="skip sizes above this many elements")
    p.add_argument("--quick", action="store_true", help="three small sizes, fp32 only")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' DDIMScheduler.step")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of repeats per measurement")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes must be chosen from {sorted(DTYPES)}, got {bad}")
    sizes = SIZES
    if args.quick:
        sizes, dtypes = SIZES[:3], ["fp32"]
    if args.max_elements is not None:
        sizes = [s for s in sizes if torch.Size(s[1]).numel() <= args.max_elements]
    if device.type == "cpu" and args.max_elements is None and not args.quick:
        # 64M-element fp32 tensors on 2 CPU cores take seconds per step: cap the CPU default at 16M.
        sizes = [s for s in sizes if torch.Size(s[1]).numel() <= 16 * 2**20]
    run(sizes, dtypes, device, with_diffusers=not args.no_diffusers, min_time=args.min_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Microbenchmark of one sampler step: fastdiff's fused step vs the same update as separate eager
torch ops vs diffusers' DDIMScheduler.step / DDPMScheduler.step, against a measured copy.

    python benchmarks/bench_step.py                # GPU if present (Triton path), else CPU
    python benchmarks/bench_step.py --quick        # three sizes, fp32 only
    python benchmarks/bench_step.py --max-elements 4194304 --dtypes fp16
    python benchmarks/bench_step.py --threads 1,2 --loop   # CPU: thread counts; + whole 50-step loops

Bytes a step must move (its floor, invariant 4 of docs/design.md): read x_t and the model output, write
x_s; in-kernel noise adds no traffic. GB/s counts those bytes; "% copy" divides by the bandwidth
of `dst.copy_(src)` on the same device, dtype and thread count (bytes read + written), measured in
the same run. On the GPU times are medians through triton.testing.do_bench. On the CPU the cases
of one (size, dtype, threads) run side by side, interleaved, for several rounds, and each keeps its
best round (the mean of a batch of calls): on a shared machine the best round is the one least
disturbed by other work, and interleaving exposes every case to the same disturbances.

Rows on the CPU: "fastdiff fused" is fastdiff.step on its resolved backend (the plain-torch reference
on the CPU); "cpp" is the C++ step fastdiff.step(..., backend="cpp") (csrc/cpu_step.cpp).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.engine.kernels import philox
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
STEP = 10  # of 50


def bench(fn, device, min_time=0.2):
    """Median seconds per call (GPU)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=max(50, int(min_time * 1000)), return_mode="median") / 1e3


def bench_side_by_side(cases, min_time=0.2, rounds=5):
    """{op: best seconds per call} for CPU cases run interleaved: each round times every case on a
    batch of calls lasting about min_time / rounds, and each case keeps its fastest round."""
    batch = {}
    for op, fn, _ in cases:
        fn()
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        batch[op] = max(1, min(1000, int(min_time / rounds / one)))
    best = {op: float("inf") for op, _, _ in cases}
    for _ in range(rounds):
        for op, fn, _ in cases:
            t0 = time.perf_counter()
            for _ in range(batch[op]):
                fn()
            best[op] = min(best[op], (time.perf_counter() - t0) / batch[op])
    return best


def commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                        text=True, stderr=subprocess.DEVNULL).strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def header(device) -> str:
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        from fastdiff import _C
        isa = _C.cpu_isa() if hasattr(_C, "cpu_isa") else "absent"
        dev = f"CPU ({cpu_name()}, {os.cpu_count()} cores, C++ step loops: {isa})"
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
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | load average {load_average()}")


def _coef(sampler, *names):
    row = sampler.table.host[STEP]
    return tuple(float(row[fastdiff.COLUMNS.index(k)]) for k in names)


def _schedulers(steps):
    """diffusers' DDIM / DDPM schedulers on fastdiff's samplers' schedule, without clipping (the
    fastdiff rows do not clip either); None where diffusers is missing."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError:
        return None, None
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    ddim.set_timesteps(steps)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    ddpm.set_timesteps(steps)
    return ddim, ddpm


def run(sizes, dtypes, device, with_diffusers=True, min_time=0.2, out=sys.stdout, threads=(1,), rounds=5):
    steps = 50
    ddim = fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading")
    ddpm = fastdiff.DDPMSampler(steps=steps, timestep_spacing="leading")
    table, ts, ids = ddim.device_state(device)
    ptable, _, pids = ddpm.device_state(device)
    step_id, pstep_id = ids[STEP], pids[STEP]
    seed = torch.tensor([0], device=device)
    a_t, s_t, c_x0, c_eps = _coef(ddim, "a_t", "b_t", "c_x0", "c_eps")
    pa_t, ps_t, pc_x0, pc_xt, p_std = _coef(ddpm, "a_t", "b_t", "c_x0", "c_xt", "std")
    sched, psched = _schedulers(steps) if with_diffusers else (None, None)
    cpp = None
    if device.type == "cpu":
        from fastdiff.engine.kernels import cpu_step as cpp
    backend = "triton" if device.type == "cuda" else "torch"
    print(header(device), file=out)
    print(f"path: fastdiff fused = vp_step on {backend}{'; cpp = the C++ CPU step' if cpp else ''}; "
          f"step {STEP} of {steps}; ddim eta=0, ddpm fixed_small; diffusers without clipping", file=out)
    cols = (f"| {'size':>13} | {'elements':>10} | {'dtype':>5} | {'thr':>3} | {'op':<28} | {'time':>10} | "
            f"{'GB/s':>8} | {'% copy':>6} |")
    print(cols, file=out)
    print("|" + "|".join("-" * len(c) for c in cols.split("|")[1:-1]) + "|", file=out)
    rows = []
    saved_threads = torch.get_num_threads()
    try:
        for name, shape in sizes:
            n = torch.Size(shape).numel()
            for dname in dtypes:
                dt = DTYPES[dname]
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(shape, generator=gen, device=device, dtype=dt)
                m = torch.randn(shape, generator=gen, device=device, dtype=dt)
                out_t = torch.empty_like(x)
                esz = x.element_size()
                step_bytes = 3 * n * esz
                cases = [
                    ("copy (x -> out)", lambda: out_t.copy_(x), 2 * n * esz),
                    ("fastdiff fused ddim", lambda: vp_step(x, m, table, step_id, out=out_t, backend=backend),
                     step_bytes),
                    ("fastdiff fused ddpm+noise", lambda: vp_step(x, m, ptable, pstep_id, seed=seed, out=out_t,
                                                                  backend=backend), step_bytes),
                    ("eager torch ops ddim", lambda: torch.add(c_x0 * ((x - s_t * m) / a_t), c_eps * m, out=out_t),
                     step_bytes),
                ]
                if sched is not None:
                    t_diff = sched.timesteps[STEP]
                    cases.append(("diffusers DDIM step", lambda: sched.step(m, t_diff, x), step_bytes))
                if cpp is not None:
                    pt_diff = psched.timesteps[STEP] if psched is not None else None
                    ddpm_gen = torch.Generator().manual_seed(1)
                    cases += [
                        ("cpp ddim", lambda: vp_step(x, m, table, step_id, out=out_t, backend="cpp"), step_bytes),
                        ("cpp ddpm, no noise", lambda: vp_step(x, m, ptable, pstep_id, out=out_t, backend="cpp"), step_bytes),
                        ("cpp ddpm+noise (philox)", lambda: vp_step(x, m, ptable, pstep_id, seed=seed, out=out_t, backend="cpp"),
                         step_bytes),
                        ("eager torch ddpm+randn", lambda: torch.add(
                            pc_x0 * ((x - ps_t * m) / pa_t) + pc_xt * x, p_std * torch.randn_like(x), out=out_t),
                         step_bytes),
                        ("torch.randn", lambda: torch.randn(shape, dtype=dt, out=out_t), n * esz),
                        ("cpp randn (philox)", lambda: philox.cpu_randn(shape, 0, out=out_t), n * esz),
                    ]
                    if psched is not None:
                        cases.append(("diffusers DDPM step", lambda: psched.step(m, pt_diff, x, generator=ddpm_gen),
                                      step_bytes))
                for th in (threads if device.type == "cpu" else (None,)):
                    if th is not None:
                        torch.set_num_threads(th)
                    if device.type == "cpu":
                        sec = bench_side_by_side(cases, min_time, rounds)
                    else:
                        sec = {op: bench(fn, device, min_time) for op, fn, _ in cases}
                    copy_bw = 2 * n * esz / sec["copy (x -> out)"]
                    here = []
                    for op, _, nbytes in cases:
                        bw = nbytes / sec[op]
                        here.append(dict(size=name, n=n, dtype=dname, threads=th or 0, op=op, sec=sec[op],
                                         gbps=bw / 1e9, pct=100 * bw / copy_bw))
                        r = here[-1]
                        print(f"| {name:>13} | {n:>10} | {dname:>5} | {th or '-':>3} | {op:<28} | "
                              f"{fmt_time(sec[op]):>10} | {r['gbps']:>8.1f} | {r['pct']:>5.0f}% |", file=out,
                              flush=True)
                    for label, a, b in (("fused ddim vs diffusers", "diffusers DDIM step", "fastdiff fused ddim"),
                                        ("cpp ddim vs diffusers", "diffusers DDIM step", "cpp ddim"),
                                        ("cpp ddpm vs diffusers", "diffusers DDPM step", "cpp ddpm+noise (philox)"),
                                        ("cpp ddpm vs torch reference", "fastdiff fused ddpm+noise",
                                         "cpp ddpm+noise (philox)"),
                                        ("cpp noise / torch.randn", None, None)):
                        if a is None:
                            if "cpp ddpm+noise (philox)" not in sec:
                                continue
                            ratio = (sec["cpp ddpm+noise (philox)"] - sec["cpp ddpm, no noise"]) / sec["torch.randn"]
                            txt = f"{ratio:.2f}x"
                        elif a in sec and b in sec:
                            txt = f"{sec[a] / sec[b]:.1f}x"
                        else:
                            continue
                        print(f"| {'':>13} | {'':>10} | {'':>5} | {'':>3} | {label:<28} | {txt:>10} | {'':>8} | "
                              f"{'':>6} |", file=out)
                    rows += here
                del x, m, out_t
    finally:
        torch.set_num_threads(saved_threads)
    return rows


def run_loops(shapes, threads, steps=50, rounds=5, out=sys.stdout):
    """Whole DDPM loops with the identity-like model 0.1 x (the model costs one elementwise op):
    diffusers' DDPMScheduler, fastdiff's torch-reference sampler and a loop over the C++ step."""
    from functools import partial
    cpu_step = partial(vp_step, backend="cpp")
    _, psched = _schedulers(steps)
    sampler = fastdiff.DDPMSampler(steps=steps, timestep_spacing="leading", backend="torch")
    ptable, pts, pids = sampler.device_state("cpu")
    seed = torch.tensor([0])

    def model(x, t):
        return 0.1 * x

    print(f"\nwhole DDPM loop, {steps} steps, model 0.1 x, float32; ms per step (best of {rounds} interleaved "
          "rounds)", file=out)
    print("| shape | thr | diffusers | fastdiff torch reference | fastdiff cpp | cpp vs diffusers |", file=out)
    print("|---|---:|---:|---:|---:|---:|", file=out)
    saved = torch.get_num_threads()
    try:
        for shape in shapes:
            x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            batch = shape[0]

            def diffusers_loop():
                x, gen = x_T.clone(), torch.Generator().manual_seed(0)
                for t in psched.timesteps:
                    x = psched.step(model(x, t), t, x, generator=gen).prev_sample
                return x

            def reference_loop():
                return sampler.loop(model, x_T.clone(), seed)

            def cpp_loop():
                x = x_T.clone()
                for i in range(steps):
                    cpu_step(x, model(x, pts[i].expand(batch)), ptable, pids[i], seed=seed, out=x)
                return x

            cases = [("diffusers", diffusers_loop), ("reference", reference_loop), ("cpp", cpp_loop)]
            for th in threads:
                torch.set_num_threads(th)
                best = {k: float("inf") for k, _ in cases}
                for k, fn in cases:
                    fn()
                for _ in range(rounds):
                    for k, fn in cases:
                        t0 = time.perf_counter()
                        fn()
                        best[k] = min(best[k], time.perf_counter() - t0)
                ms = {k: v / steps * 1e3 for k, v in best.items()}
                print(f"| {'x'.join(map(str, shape))} | {th} | {ms['diffusers']:.3f} | {ms['reference']:.3f} | "
                      f"{ms['cpp']:.3f} | {ms['diffusers'] / ms['cpp']:.1f}x |", file=out, flush=True)
    finally:
        torch.set_num_threads(saved)


def fmt_time(sec):
    return f"{sec * 1e6:.1f} us" if sec < 1e-2 else f"{sec * 1e3:.2f} ms"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--max-elements", type=int, default=None, help="skip sizes above this many elements")
    p.add_argument("--quick", action="store_true", help="three small sizes, fp32 only")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' schedulers")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of repeats per measurement")
    p.add_argument("--threads", default=None,
                   help="CPU: comma list of torch.set_num_threads values (default: the current count)")
    p.add_argument("--rounds", type=int, default=5, help="CPU: interleaved rounds, best kept")
    p.add_argument("--loop", action="store_true", help="CPU: also time whole 50-step DDPM loops")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes must be chosen from {sorted(DTYPES)}, got {bad}")
    try:
        threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else (torch.get_num_threads(),)
    except ValueError:
        p.error(f"--threads must be a comma list of positive integers, got {args.threads!r}")
    if any(t < 1 for t in threads):
        p.error(f"--threads must be positive, got {args.threads!r}")
    sizes = SIZES
    if args.quick:
        sizes, dtypes = SIZES[:3], ["fp32"]
    if args.max_elements is not None:
        sizes = [s for s in sizes if torch.Size(s[1]).numel() <= args.max_elements]
    if device.type == "cpu" and args.max_elements is None and not args.quick:
        # 64M-element fp32 tensors on 2 CPU cores take seconds per step: cap the CPU default at 16M.
        sizes = [s for s in sizes if torch.Size(s[1]).numel() <= 16 * 2**20]
    run(sizes, dtypes, device, with_diffusers=not args.no_diffusers, min_time=args.min_time, threads=threads,
        rounds=args.rounds)
    if args.loop and device.type == "cpu" and not args.no_diffusers:
        run_loops([(1, 4, 64, 64), (16, 4, 64, 64)], threads, rounds=args.rounds)
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One DDIM step (eta = 0, epsilon prediction) four ways, against a device-to-device copy:

* fastdiff's fused kernel (``fastdiff.step``: one launch, fp32 arithmetic, one pass over memory);
* the same update as eager torch ops (x0 = (x - sigma_t eps)/sqrt(ab_t); x_s = c_x0 x0 + c_eps eps);
* diffusers' ``DDIMScheduler.step`` (eta = 0, clip_sample off);
* ``torch.compile`` of the eager function (mode max-autotune by default, one specialised graph
  per size and dtype; the compile time, autotuning included, is its own column).

    python benchmarks/bench_gpu_step.py                 # all sizes and dtypes (GPU)
    python benchmarks/bench_gpu_step.py --quick         # small sizes, fp32: checks the script on a CPU

GB/s counts the bytes a step must move (read x_t and eps, write x_s: 3 n bytes-per-element);
"% copy" divides by the bandwidth of ``dst.copy_(src)`` (2 n bytes-per-element) measured in the
same run at the same size and dtype. Inputs rotate over several buffer sets so that a working
set above the L2 size is read from memory, not from the cache.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import fastdiff
from bench_gpu_common import DTYPES, Table, fmt_time, pick_device, provenance, sync, time_call
from fastdiff.engine.step import step as vp_step

SIZES = [
    ("1x4x64x64", (1, 4, 64, 64)),
    ("16x4x128x128 (1M)", (16, 4, 128, 128)),
    ("64x4x256x256 (16M)", (64, 4, 256, 256)),
    ("256x4x256x256 (64M)", (256, 4, 256, 256)),
]
QUICK_SIZES = [("1x4x64x64", (1, 4, 64, 64)), ("4x4x64x64", (4, 4, 64, 64))]
ROTATE_BYTES = 256 * 2**20  # rotate inputs over at least this much memory (H100 L2: 50 MB)


def ddim_update(x, eps, a_t: float, s_t: float, c_x0: float, c_eps: float):
    """The deterministic DDIM step as plain torch ops (the eager baseline and the compiled one)."""
    x0 = (x - s_t * eps) / a_t
    return c_x0 * x0 + c_eps * eps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="two small sizes, fp32, short timings")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--max-elements", type=int, default=None)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode; 'none' skips compile")
    p.add_argument("--compile-budget", type=float, default=150.0,
                   help="seconds of compiling after which the remaining sizes skip torch.compile")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--out", default=None, help="directory for step.md / step.json")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.compile_mode is None:  # a quick CPU check skips minutes of inductor compiling
        args.compile_mode = "none" if args.quick and device.type != "cuda" else "max-autotune"
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes must be chosen from {sorted(DTYPES)}, got {dtypes}")
    sizes = SIZES
    if args.quick:
        sizes, dtypes, args.min_time = QUICK_SIZES, ["fp32"], min(args.min_time, 0.05)
    if args.max_elements:
        sizes = [s for s in sizes if math.prod(s[1]) <= args.max_elements]

    steps, i = 50, 10
    sampler = fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading", prev_timestep_rule="ratio")
    table, ts, ids = sampler.device_state(device)
    row = sampler.table.host[i]
    col = fastdiff.COLUMNS.index
    a_t, s_t, c_x0, c_eps = (float(row[col(k)]) for k in ("a_t", "b_t", "c_x0", "c_eps"))
    try:
        from diffusers import DDIMScheduler
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        sched.set_timesteps(steps)
        t_diff = sched.timesteps[i]
        assert int(t_diff) == int(ts[i]), "diffusers and fastdiff disagree on the timesteps"
    except ImportError:
        sched = None
    backend = "triton" if device.type == "cuda" else "torch"
    prov = provenance(device)
    tab = Table("Step kernel: fused vs eager torch vs diffusers vs torch.compile",
                ["size", "dtype", "op", "time", "GB/s", "% copy", "time / fused"], prov,
                notes=[f"DDIM eta=0 step {i}/{steps}; fastdiff path: {backend}; torch.compile mode: "
                       f"{args.compile_mode} (compile time, autotuning included, on its own row; max-autotune "
                       "runs the compiled step in a CUDA graph, which copies non-static inputs into its "
                       "buffers on each call)."])
    tab.autosave(args.out, "step")
    compile_spent = 0.0
    for size_name, shape in sizes:
        n = math.prod(shape)
        for dname in dtypes:
            dt = DTYPES[dname]
            esz = torch.empty((), dtype=dt).element_size()
            sets = max(1, min(32, math.ceil(ROTATE_BYTES / (3 * n * esz)))) if device.type == "cuda" else 1
            gen = torch.Generator(device=device).manual_seed(0)
            xs = [torch.randn(shape, generator=gen, device=device, dtype=dt) for _ in range(sets)]
            ms = [torch.randn(shape, generator=gen, device=device, dtype=dt) for _ in range(sets)]
            outs = [torch.empty_like(xs[0]) for _ in range(sets)]
            k = [0]

            def rot():
                k[0] = (k[0] + 1) % sets
                return k[0]

            def copy():
                j = rot()
                outs[j].copy_(xs[j])

            def fused():
                j = rot()
                vp_step(xs[j], ms[j], table, ids[i], out=outs[j], backend=backend)

            def eager():
                j = rot()
                ddim_update(xs[j], ms[j], a_t, s_t, c_x0, c_eps)

            def diffusers_step():
                j = rot()
                sched.step(ms[j], t_diff, xs[j], eta=0.0)

            copy_s = time_call(copy, device, min_time=args.min_time)
            copy_bw = 2 * n * esz / copy_s
            results = {}

            def report(op, sec, moved=3 * n * esz, extra=None):
                bw = moved / sec
                results[op] = sec
                vs = f"{sec / results['fastdiff fused']:.2f}x" if "fastdiff fused" in results else "-"
                tab.add([size_name, dname, op, fmt_time(sec), f"{bw / 1e9:.0f}", f"{100 * bw / copy_bw:.0f}%", vs],
                        dict(size=size_name, elements=n, dtype=dname, op=op, seconds=sec, gbps=bw / 1e9,
                             pct_copy=100 * bw / copy_bw, **(extra or {})))

            report("copy", copy_s, moved=2 * n * esz)
            report("fastdiff fused", time_call(fused, device, min_time=args.min_time))
            report("eager torch ops", time_call(eager, device, min_time=args.min_time))
            if sched is not None:
                report("diffusers DDIMScheduler.step", time_call(diffusers_step, device, min_time=args.min_time))
            if args.compile_mode != "none":
                if compile_spent > args.compile_budget:
                    tab.add([size_name, dname, "torch.compile", "skipped (compile budget spent)", "-", "-", "-"])
                else:
                    torch._dynamo.reset()
                    compiled = torch.compile(ddim_update, mode=args.compile_mode, dynamic=False)
                    sync(device)
                    t0 = time.perf_counter()
                    compiled(xs[0], ms[0], a_t, s_t, c_x0, c_eps)
                    sync(device)
                    ctime = time.perf_counter() - t0
                    compile_spent += ctime

                    def comp():
                        j = rot()
                        compiled(xs[j], ms[j], a_t, s_t, c_x0, c_eps)

                    report(f"torch.compile ({args.compile_mode})", time_call(comp, device, min_time=args.min_time),
                           extra=dict(compile_seconds=ctime))
                    tab.add([size_name, dname, "  compile time (first call)", fmt_time(ctime), "-", "-", "-"])
            del xs, ms, outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    tab.save(args.out, "step")
    return 0


if __name__ == "__main__":
    sys.exit(main())

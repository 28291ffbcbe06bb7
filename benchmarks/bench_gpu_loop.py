"""Sampler overhead: a 50-step loop with an identity model (model(x, t) = x costs nothing), so the
time is what the sampler itself spends per step.

* fastdiff eager: ``Sampler.sample`` (one fused launch per step, no host sync);
* fastdiff graphed: ``GraphedSampler`` (one seed write, one graph replay, one output copy per call;
  also with ``copy=False``, returning the graph's buffer);
* diffusers: the scheduler loop of its pipelines (``scheduler.step(...).prev_sample`` per step).

    python benchmarks/bench_gpu_loop.py            # GPU
    python benchmarks/bench_gpu_loop.py --quick    # small, CPU check

µs/step = (time of the whole call) / steps; x_T is given to every variant.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

import fastdiff
from bench_gpu_common import DTYPES, Table, pick_device, provenance, time_call
from fastdiff.graphs import GraphedSampler, GraphFallbackWarning


def identity(x, t):
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="one small shape, 10 steps, short timings")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--out", default=None, help="directory for loop.md / loop.json")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cases = [((1, 4, 64, 64), "fp32"), ((1, 4, 64, 64), "fp16"), ((16, 4, 64, 64), "fp16")]
    if args.quick:
        cases, args.steps, args.min_time = [((1, 4, 16, 16), "fp32")], 10, 0.05
    try:
        import diffusers
    except ImportError:
        diffusers = None
    steps = args.steps
    prov = provenance(device)
    tab = Table(f"Sampler overhead: {steps} steps, identity model",
                ["shape", "dtype", "sampler", "loop", "µs/step", "speedup vs diffusers"], prov,
                notes=["µs/step = time of one whole sampling call / steps (x_T given); the identity model "
                       "costs nothing, so this is the sampler's own cost per step."
                       + (" On a CPU 'graphed' runs the eager fallback." if device.type != "cuda" else "")])
    tab.autosave(args.out, "loop")
    warnings.simplefilter("ignore", GraphFallbackWarning)
    for shape, dname in cases:
        dt = DTYPES[dname]
        x_T = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device, dtype=dt)
        kinds = [
            ("ddim eta=0", fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading",
                                                prev_timestep_rule="ratio"),
             (lambda: diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)) if diffusers else None),
            ("ddpm", fastdiff.DDPMSampler(steps=steps, timestep_spacing="leading"),
             (lambda: diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)) if diffusers else None),
        ]
        for kind, sampler, make_sched in kinds:
            graphed = GraphedSampler(sampler, identity)
            runs = [("fastdiff eager", lambda: sampler.sample(identity, x=x_T, seed=1)),
                    ("fastdiff graphed", lambda: graphed(x=x_T, seed=1)),
                    ("fastdiff graphed, copy=False", lambda: graphed(x=x_T, seed=1, copy=False))]
            if make_sched is not None:
                sched = make_sched()
                sched.set_timesteps(steps)  # host timesteps, as in diffusers' pipelines
                gen = torch.Generator(device=device).manual_seed(1)

                def diffusers_loop():
                    x = x_T.clone()
                    for t in sched.timesteps:
                        x = sched.step(identity(x, t), t, x, generator=gen).prev_sample
                    return x

                runs.append(("diffusers " + type(sched).__name__, diffusers_loop))
            times = {name: time_call(fn, device, min_time=args.min_time, batches=5) for name, fn in runs}
            ref = next((v for k, v in times.items() if k.startswith("diffusers")), None)
            for name, sec in times.items():
                us = sec / steps * 1e6
                tab.add(["x".join(map(str, shape)), dname, kind, name, f"{us:.1f}",
                         f"{ref / sec:.2f}x" if ref else "-"],
                        dict(shape=list(shape), dtype=dname, sampler=kind, loop=name, seconds=sec, us_per_step=us,
                             elements=math.prod(shape), steps=steps))
            graphed.reset()
    tab.save(args.out, "loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())

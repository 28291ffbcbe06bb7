"""Sampler overhead: a 50-step loop with an identity model (model(x, t) = x costs nothing), so the
time is what the sampler itself spends per step.

* fastdiff eager: ``Sampler.sample`` (one fused launch per step, no host sync);
* fastdiff graphed: ``GraphedSampler`` (one seed write, one graph replay, one output copy per call;
  also with ``copy=False``, returning the graph's buffer);
* diffusers: the scheduler loop of its pipelines (``scheduler.step(...).prev_sample`` per step).

    python benchmarks/bench_gpu_loop.py            # GPU
    python benchmarks/bench_gpu_loop.py --dry      # tiny, CPU check of the script

µs/step = (time of the whole call) / steps; x_T is given to every variant. Each variant runs on
its own: a failure is an error row, and what no longer fits before --deadline a skipped row.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import fastdiff
from bench_gpu_common import (DTYPES, Deadline, Table, add_suite_args, attempt, import_diffusers, pick_device,
                              provenance, quiet_graph_fallback, time_call)


def identity(x, t):
    return x


def with_runner(sampler):
    return sampler, fastdiff.GraphedSampler(sampler, identity)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_suite_args(p, "loop")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--min-time", type=float, default=0.3)
    args = p.parse_args(argv)
    device = pick_device(args.device, args.dry)
    cases = [((1, 4, 64, 64), "fp32"), ((1, 4, 64, 64), "fp16"), ((16, 4, 64, 64), "fp16")]
    if args.dry:
        cases, args.steps, args.min_time = [((1, 4, 16, 16), "fp32")], 5, 0.02
    diffusers, diffusers_missing = import_diffusers()
    deadline = Deadline.from_args(args)
    steps = args.steps
    tab = Table(f"Sampler overhead: {steps} steps, identity model",
                ["shape", "dtype", "sampler", "loop", "µs/step", "speedup vs diffusers"], provenance(device, args.dry),
                notes=["µs/step = time of one whole sampling call / steps (x_T given); the identity model "
                       "costs nothing, so this is the sampler's own cost per step."
                       + (" On a CPU 'graphed' runs the eager fallback." if device.type != "cuda" else "")])
    tab.autosave(args.out, "loop")
    quiet_graph_fallback()
    errors = 0
    for shape, dname in cases:
        dt = DTYPES[dname]
        sname = "x".join(map(str, shape))
        x_T = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device, dtype=dt)
        kinds = [
            ("ddim eta=0", lambda: fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading",
                                                        prev_timestep_rule="ratio"),
             lambda: diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)),
            ("ddpm", lambda: fastdiff.DDPMSampler(steps=steps, timestep_spacing="leading"),
             lambda: diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)),
        ]
        for kind, make_sampler, make_sched in kinds:
            label = f"loop/{sname}/{dname}/{kind}"
            made, err = attempt(label + "/setup", lambda: with_runner(make_sampler()))
            if err:
                tab.add_status([sname, dname, kind, "setup"], err)
                errors += 1
                continue
            sampler, graphed = made
            # diffusers first: it is the reference of every row's speedup, so each row can be
            # written as soon as it is measured (a phase killed mid-way keeps its rows)
            runs = []
            if diffusers is None:
                tab.add_status([sname, dname, kind, "diffusers"], "skipped: " + diffusers_missing)
            else:
                def make_diffusers_state():
                    sched = make_sched()
                    sched.set_timesteps(steps)  # host timesteps, as in diffusers' pipelines
                    return {"sched": sched, "gen": torch.Generator(device=device).manual_seed(1)}

                state, err = attempt(label + "/diffusers setup", make_diffusers_state)
                if err:
                    tab.add_status([sname, dname, kind, "diffusers"], err)
                    errors += 1
                else:
                    def diffusers_loop():
                        x = x_T.clone()
                        for t in state["sched"].timesteps:
                            x = state["sched"].step(identity(x, t), t, x, generator=state["gen"]).prev_sample
                        return x

                    runs.append(("diffusers " + type(state["sched"]).__name__, diffusers_loop))
            runs += [("fastdiff eager", lambda: sampler.sample(identity, x=x_T, seed=1)),
                     ("fastdiff graphed", lambda: graphed(x=x_T, seed=1)),
                     ("fastdiff graphed, copy=False", lambda: graphed(x=x_T, seed=1, copy=False))]
            ref = None
            for name, fn in runs:
                # the first graphed call warms up and captures (about two loops: a guess)
                refused = deadline.refuses(2.0 + 3 * args.min_time)
                if refused:
                    tab.add_status([sname, dname, kind, name], refused)
                    continue
                sec, err = attempt(f"{label}/{name}", lambda: time_call(fn, device, min_time=args.min_time, batches=5))
                if err:
                    tab.add_status([sname, dname, kind, name], err)
                    errors += 1
                    continue
                if name.startswith("diffusers"):
                    ref = sec
                us = sec / steps * 1e6
                tab.add([sname, dname, kind, name, f"{us:.1f}", f"{ref / sec:.2f}x" if ref else "-"],
                        dict(shape=list(shape), dtype=dname, sampler=kind, loop=name, seconds=sec, us_per_step=us,
                             elements=math.prod(shape), steps=steps))
            attempt(label + "/reset", graphed.reset)
    print(f"\nloop: {errors} errors", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

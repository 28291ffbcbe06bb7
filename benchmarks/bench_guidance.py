"""One classifier-free-guided step on the CPU: fastdiff's fused guidance (the C++ step reads the
unconditional and conditional outputs u and c and forms m = u + w (c - u) in the same pass, w in
device memory) against the unfused torch sequence a pipeline runs (m = u + w * (c - u) as torch
ops, then fastdiff's step on m), with and without guidance rescale (diffusers' rescale_noise_cfg
written as torch ops, against the fused step's per-sample factor).

    python benchmarks/bench_guidance.py                    # 1x4x64x64 and 16x4x64x64, fp32, one thread
    python benchmarks/bench_guidance.py --dtypes fp32,bf16 --rounds 15

The step is DDIM (eta = 0), row 10 of 50 (leading spacing), on the C++ backend, out of place; u and
c are the halves of one [2B, ...] model output (views, as a pipeline's ``noise_pred.chunk(2)``).
The cases of one size and dtype run interleaved for several rounds and each keeps its best round
(benchmarks/bench_step.py's bench_side_by_side); "unfused / fused" divides the two times of the
same run. diffusers' rows (its pipeline's combination, then DDIMScheduler.step) where it imports.
The last two rows time the doubled model input [x; x] the guided sampler loop needs: torch.cat
against the loop's copy of the first half of one [2B] buffer into its second (Sampler.loop).
"""
from __future__ import annotations

import argparse
import sys

import torch

import fastdiff
from bench_step import DTYPES, STEP, bench_side_by_side, fmt_time, header, load_average
from fastdiff.engine.step import StepOptions, step

SIZES = [("1x4x64x64", (1, 4, 64, 64)), ("16x4x64x64", (16, 4, 64, 64))]
W, PHI, STEPS = 7.5, 0.7, 50


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' rescale_noise_cfg (pipelines/stable_diffusion), as torch ops."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def cases_for(shape, dt, table, step_id, sched):
    gen = torch.Generator().manual_seed(0)
    b = shape[0]
    x = torch.randn(shape, generator=gen).to(dt)
    noise_pred = torch.randn((2 * b,) + shape[1:], generator=gen).to(dt)
    u, c = noise_pred.chunk(2)
    out = torch.empty_like(x)
    w = torch.tensor([W])
    guided, rescaled = StepOptions(guidance=True), StepOptions(guidance=True, guidance_rescale=PHI)

    def fused(opts):
        return lambda: step(x, u, table, step_id, opts, guidance_cond=c, guidance_scale=w, out=out, backend="cpp")

    def unfused(rescale):
        def run():
            m = u + W * (c - u)
            if rescale:
                m = rescale_noise_cfg(m, c, PHI)
            return step(x, m, table, step_id, out=out, backend="cpp")
        return run

    cases = [
        ("step alone (no guidance)", lambda: step(x, u, table, step_id, out=out, backend="cpp")),
        ("fused cfg", fused(guided)),
        ("torch cfg, then the step", unfused(False)),
        ("fused cfg + rescale", fused(rescaled)),
        ("torch cfg + rescale, step", unfused(True)),
    ]
    if sched is not None:
        t = sched.timesteps[STEP]
        cases.append(("diffusers cfg + DDIM step", lambda: sched.step(u + W * (c - u), t, x)))
    pair = torch.empty_like(noise_pred)
    first, second = pair[:b], pair[b:]
    cases += [("[x; x]: torch.cat", lambda: torch.cat([x, x])), ("[x; x]: copy to 2nd half", lambda: second.copy_(first))]
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32, fp16, bf16")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the C++ step follows it)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds, best kept")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of calls per case over all rounds")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes must be chosen from {sorted(DTYPES)}, got {dtypes}")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    ddim = fastdiff.DDIMSampler(steps=STEPS, eta=0.0, timestep_spacing="leading")
    table, _, ids = ddim.device_state(device)
    try:
        from diffusers import DDIMScheduler
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        sched.set_timesteps(STEPS)
    except ImportError:
        sched = None
    print(header(device))
    print(f"DDIM eta=0, step {STEP} of {STEPS}; guidance scale {W}, rescale {PHI}; C++ step; {args.threads} thread(s); "
          f"best of {args.rounds} interleaved rounds")
    print("| size | dtype | op | time | vs fused (or copy) |")
    print("|---|---|---|---:|---:|")
    for name, shape in SIZES:
        for dname in dtypes:
            cases = cases_for(shape, DTYPES[dname], table, ids[STEP], sched)
            sec = bench_side_by_side([(op, fn, 0) for op, fn in cases], args.min_time, args.rounds)
            for op, _ in cases:
                ref = sec["fused cfg + rescale" if "rescale" in op else "[x; x]: copy to 2nd half" if "[x; x]" in op
                          else "fused cfg"]
                print(f"| {name} | {dname} | {op} | {fmt_time(sec[op])} | {sec[op] / ref:.2f}x |", flush=True)
            for label, a, b in (("cfg: unfused / fused", "torch cfg, then the step", "fused cfg"),
                                ("cfg + rescale: unfused / fused", "torch cfg + rescale, step", "fused cfg + rescale"),
                                ("[x; x]: cat / copy", "[x; x]: torch.cat", "[x; x]: copy to 2nd half")):
                print(f"| {name} | {dname} | **{label}** | | **{sec[a] / sec[b]:.2f}x** |")
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end: a small diffusers UNet2DModel (random weights, built here), DDIM eta = 0, 50 steps,
at batch 1 and 16, 32x32 and 64x64:

* diffusers ``DDIMPipeline`` (its own loop: UNet call + ``DDIMScheduler.step`` per step);
* fastdiff eager (``DDIMSampler.sample``: UNet call + one fused launch per step);
* fastdiff graphed (``GraphedSampler``: the whole loop, UNet included, as one CUDA graph);
* ``torch.compile(unet, mode="reduce-overhead")`` driving diffusers' scheduler loop (compile
  and CUDA-graph recording time on its own row).

    python benchmarks/bench_gpu_e2e.py                 # GPU, fp16
    python benchmarks/bench_gpu_e2e.py --dry           # tiny sizes, 5 steps: CPU check of the script

All variants do the same arithmetic (DDIMScheduler's defaults: leading spacing, clip_sample,
final alpha_bar = 1); the table's last column is the largest difference between each variant's
samples and diffusers' scheduler loop from the same x_T. Speedups are over the diffusers pipeline
in the same run.

Order, most wanted first: every configuration without torch.compile, then the compiles, batch 1
first (the end-to-end target is at batch 1). A compile that would pass the deadline (estimated
by bench_gpu_common.compile_estimate) is a skipped row. Without diffusers (not on the GPU
machine unless its wheels travel in .whl/) the table is one row saying so.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fastdiff
from bench_gpu_common import (DTYPES, Deadline, Table, add_suite_args, attempt, compile_estimate, error_text,
                              fmt_time, import_diffusers, pick_device, provenance, quiet_graph_fallback, sync,
                              time_call)

# No UNet compile has been timed on the GPU machine: this guess stands until the first one is.
COMPILE_GUESS_S = 60.0


def make_unet(resolution: int, device, dtype, width: int = 32):
    """A small UNet2DModel: three levels (width, 2 width, 2 width), attention at the middle level."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return unet.to(device=device, dtype=dtype).eval()


class E2E:
    """One configuration (batch, resolution): its UNet, samplers, x_T and the reference sample."""

    def __init__(self, diffusers, unet, batch, res, steps, device, dtype):
        self.batch, self.res, self.steps, self.device, self.dtype = batch, res, steps, device, dtype
        self.unet = unet
        self.shape = (batch, 3, res, res)
        self.sched = diffusers.DDIMScheduler(num_train_timesteps=1000)  # clip_sample, leading, set_alpha_to_one
        self.pipe = diffusers.DDIMPipeline(unet=unet, scheduler=self.sched)
        self.pipe.set_progress_bar_config(disable=True)
        self.sampler = fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading",
                                            prev_timestep_rule="ratio", clip_sample=True)
        self.graphed = fastdiff.GraphedSampler(self.sampler, self.model)
        self.x_T = torch.randn(self.shape, generator=torch.Generator(device=device).manual_seed(0), device=device,
                               dtype=dtype)
        self.gen = torch.Generator(device=device)
        self.want = None

    def model(self, x, t):
        return self.unet(x, t, return_dict=False)[0]

    def scheduler_loop(self, net):
        self.sched.set_timesteps(self.steps)
        t_dev = self.sched.timesteps.to(self.device)  # a device timestep keeps the compiled UNet's graph whole
        x = self.x_T.clone()
        for i, t in enumerate(self.sched.timesteps):
            x = self.sched.step(net(x, t_dev[i], return_dict=False)[0], t, x, eta=0.0).prev_sample
        return x

    def variants(self):
        """(name, timed call, the sample from x_T to compare, or None)."""
        return [
            ("diffusers DDIMPipeline",
             lambda: self.pipe(batch_size=self.batch, generator=self.gen.manual_seed(0), eta=0.0,
                               num_inference_steps=self.steps, output_type="pt", return_dict=False), None),
            ("fastdiff eager", lambda: self.sampler.sample(self.model, self.shape, seed=0, device=self.device,
                                                           dtype=self.dtype),
             lambda: self.sampler.sample(self.model, x=self.x_T)),
            ("fastdiff graphed", lambda: self.graphed(self.shape, seed=0, device=self.device, dtype=self.dtype),
             lambda: self.graphed(x=self.x_T)),
        ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_suite_args(p, "e2e")
    p.add_argument("--dtype", default=None, help="fp16 (GPU default), bf16 or fp32 (CPU default)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--resolutions", default="32,64")
    p.add_argument("--width", type=int, default=32, help="UNet base channels")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the UNet; 'none' skips")
    p.add_argument("--compile-guess", type=float, default=COMPILE_GUESS_S,
                   help="seconds a compile is assumed to take until one is timed")
    p.add_argument("--min-time", type=float, default=0.6, help="seconds of timed repeats per variant")
    args = p.parse_args(argv)
    device = pick_device(args.device, args.dry)
    no_compile = "--compile-mode none"
    if args.compile_mode is None:
        if args.dry and device.type != "cuda":
            args.compile_mode, no_compile = "none", "dry run on a CPU (inductor takes minutes; pass --compile-mode)"
        else:
            args.compile_mode = "reduce-overhead"
    dname = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if dname not in DTYPES:
        p.error(f"--dtype must be one of {sorted(DTYPES)}")
    dtype = DTYPES[dname]
    batches = [int(b) for b in args.batches.split(",")]
    resolutions = [int(r) for r in args.resolutions.split(",")]
    if args.dry:
        batches, resolutions, args.steps, args.width, args.min_time = [1, 2], [16], 3, 8, 0.02
    steps = args.steps
    deadline = Deadline.from_args(args)
    diffusers, missing = import_diffusers()
    quiet_graph_fallback()
    tab = Table(f"End to end: UNet2DModel (width {args.width}, random weights), DDIM {steps} steps, {dname}",
                ["batch", "res", "loop", "time", "ms/step", "speedup vs DDIMPipeline", "max |Δ| vs diffusers"],
                provenance(device, args.dry),
                notes=[f"torch.compile mode: {args.compile_mode}, dynamic=False; its compile + graph recording "
                       "time is the first call's, on its own row."
                       + (" On a CPU 'graphed' runs the eager fallback." if device.type != "cuda" else "")])
    tab.autosave(args.out, "e2e")
    if diffusers is None:
        tab.add_status(["-", "-", "all"], "skipped: " + missing)
        return 0
    errors = 0
    plot_note = []

    def status(cells, text):
        nonlocal errors
        errors += text.startswith("error")
        tab.add_status(cells, text)

    def replot():
        if not args.out or plot_note:
            return
        try:
            from plot_e2e import plot
            plot(Path(args.out) / "e2e.json", Path(args.out) / "e2e_speedup.png")
        except ImportError as exc:  # matplotlib: on the GPU machine, not on every CPU one
            plot_note.append(f"e2e_speedup.png not drawn: {error_text(exc)}")
            tab.notes.append(plot_note[-1])
            print(plot_note[-1], flush=True)

    # -- without torch.compile, every configuration ----------------------------------------------
    configs, pipeline_s = {}, {}
    unets = {}
    with torch.no_grad():
        for res in resolutions:
            for batch in batches:
                cells = [batch, res]
                refused = deadline.refuses(3.0 + 3 * args.min_time)
                if refused:
                    status(cells + ["all (no compile)"], refused)
                    continue

                def build():
                    if res not in unets:
                        unets[res] = make_unet(res, device, dtype, args.width)
                    cfg = E2E(diffusers, unets[res], batch, res, steps, device, dtype)
                    cfg.want = cfg.scheduler_loop(cfg.unet)
                    return cfg

                cfg, err = attempt(f"e2e/{batch}/{res}/setup", build)
                if err:
                    status(cells + ["setup"], err)
                    continue
                configs[(batch, res)] = cfg
                for name, fn, sample in cfg.variants():
                    label = f"e2e/{batch}/{res}/{name}"
                    refused = deadline.refuses(2.0 + 3 * args.min_time)
                    if refused:
                        status(cells + [name], refused)
                        continue
                    diff = None
                    if sample is not None:
                        diff, err = attempt(label + "/vs diffusers", lambda: float((sample() - cfg.want).abs().max()))
                        if err:
                            status(cells + [name], err)
                            continue
                    sec, err = attempt(label, lambda: time_call(fn, device, min_time=args.min_time, batches=3,
                                                                warmup=1))
                    if err:
                        status(cells + [name], err)
                        continue
                    if name == "diffusers DDIMPipeline":
                        pipeline_s[(batch, res)] = sec
                    ref = pipeline_s.get((batch, res))
                    tab.add([batch, res, name, fmt_time(sec), f"{sec / steps * 1e3:.3f}",
                             f"{ref / sec:.2f}x" if ref else "-", "-" if diff is None else f"{diff:.2e}"],
                            dict(batch=batch, resolution=res, loop=name, seconds=sec, ms_per_step=sec / steps * 1e3,
                                 speedup=ref / sec if ref else None, max_abs_diff=diff, dtype=dname, steps=steps))
                attempt(f"e2e/{batch}/{res}/reset", cfg.graphed.reset)
                replot()

        # -- torch.compile, batch 1 first ---------------------------------------------------------
        op = "torch.compile" + ("" if args.compile_mode == "none" else f" ({args.compile_mode})")
        compiled = {}
        seen = []
        for (batch, res) in sorted(configs, key=lambda c: (c[0], c[1])):
            cells = [batch, res, op]
            if args.compile_mode == "none":
                status(cells, "skipped: " + no_compile)
                continue
            est = compile_estimate(seen, args.compile_guess)
            refused = deadline.refuses(est + 3 * args.min_time + 2.0)
            if refused:
                why = (f"estimated from the last compile, {seen[-1]:.1f} s" if seen
                       else f"a compile is guessed at {est:.0f} s, none timed yet")
                status(cells, f"{refused}; {why}")
                continue
            cfg = configs[(batch, res)]

            def first_call():
                if res not in compiled:
                    compiled[res] = torch.compile(cfg.unet, mode=args.compile_mode, dynamic=False)
                sync(device)
                t0 = time.perf_counter()
                got = cfg.scheduler_loop(compiled[res])
                sync(device)
                return time.perf_counter() - t0, float((got - cfg.want).abs().max())

            got, err = attempt(f"e2e/{batch}/{res}/{op}", first_call)
            if err:
                status(cells, err)
                continue
            first, diff = got
            seen.append(first)
            sec, err = attempt(f"e2e/{batch}/{res}/{op} timing",
                               lambda: time_call(lambda: cfg.scheduler_loop(compiled[res]), device,
                                                 min_time=args.min_time, batches=3, warmup=1))
            if err:
                status(cells, err)
            else:
                ref = pipeline_s.get((batch, res))
                tab.add([batch, res, op, fmt_time(sec), f"{sec / steps * 1e3:.3f}", f"{ref / sec:.2f}x" if ref else "-",
                         f"{diff:.2e}"],
                        dict(batch=batch, resolution=res, loop=op, seconds=sec, ms_per_step=sec / steps * 1e3,
                             speedup=ref / sec if ref else None, max_abs_diff=diff, dtype=dname, steps=steps))
            tab.add([batch, res, "  torch.compile: first call (compile + record)", fmt_time(first), "-", "-", "-"],
                    dict(batch=batch, resolution=res, loop="compile", seconds=first))
            replot()
    print(f"\ne2e: {errors} errors", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end: a small diffusers UNet2DModel (random weights, built here), DDIM eta = 0, 50 steps,
at batch 1 and 16, 32x32 and 64x64:

* diffusers ``DDIMPipeline`` (its own loop: UNet call + ``DDIMScheduler.step`` per step);
* fastdiff eager (``DDIMSampler.sample``: UNet call + one fused launch per step);
* fastdiff graphed (``GraphedSampler``: the whole loop, UNet included, as one CUDA graph);
* ``torch.compile(unet, mode="reduce-overhead")`` driving diffusers' scheduler loop (compile
  and CUDA-graph recording time on its own row).

    python benchmarks/bench_gpu_e2e.py                 # GPU, fp16
    python benchmarks/bench_gpu_e2e.py --quick         # tiny sizes, 5 steps: CPU check

All variants do the same arithmetic (DDIMScheduler's defaults: leading spacing, clip_sample,
final alpha_bar = 1); the table's last column is the largest difference between fastdiff's and
diffusers' samples from the same x_T. Speedups are over the diffusers pipeline in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import fastdiff
from bench_gpu_common import DTYPES, Table, fmt_time, pick_device, provenance, sync, time_call
from fastdiff.graphs import GraphedSampler, GraphFallbackWarning


def make_unet(resolution: int, device, dtype, width: int = 32):
    """A small UNet2DModel: three levels (width, 2 width, 2 width), attention at the middle level."""
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return unet.to(device=device, dtype=dtype).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp16 (GPU default), bf16 or fp32 (CPU default)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--resolutions", default="32,64")
    p.add_argument("--width", type=int, default=32, help="UNet base channels")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the UNet; 'none' skips")
    p.add_argument("--compile-budget", type=float, default=240.0,
                   help="seconds of compiling after which the remaining configurations skip torch.compile")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed repeats per variant")
    p.add_argument("--quick", action="store_true", help="batch 1 and 2 at 16x16, width 8, 5 steps")
    p.add_argument("--out", default=None, help="directory for e2e.md / e2e.json / e2e_speedup.png")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.compile_mode is None:  # a quick CPU check skips minutes of inductor compiling
        args.compile_mode = "none" if args.quick and device.type != "cuda" else "reduce-overhead"
    dname = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if dname not in DTYPES:
        p.error(f"--dtype must be one of {sorted(DTYPES)}")
    dtype = DTYPES[dname]
    batches = [int(b) for b in args.batches.split(",")]
    resolutions = [int(r) for r in args.resolutions.split(",")]
    if args.quick:
        batches, resolutions, args.steps, args.width, args.min_time = [1, 2], [16], 5, 8, 0.1
    try:
        from diffusers import DDIMPipeline, DDIMScheduler
    except ImportError:
        print("diffusers is not installed: the end-to-end benchmark needs its UNet2DModel", file=sys.stderr)
        return 2
    steps = args.steps
    warnings.simplefilter("ignore", GraphFallbackWarning)
    prov = provenance(device)
    tab = Table(f"End to end: UNet2DModel (width {args.width}, random weights), DDIM {steps} steps, {dname}",
                ["batch", "res", "loop", "time", "ms/step", "speedup vs DDIMPipeline", "max |Δ| vs diffusers"],
                prov, notes=[f"torch.compile mode: {args.compile_mode}, dynamic=False; its compile + graph "
                             "recording time is the first call's, on its own row."
                             + (" On a CPU 'graphed' runs the eager fallback." if device.type != "cuda" else "")])
    tab.autosave(args.out, "e2e")
    compile_spent = 0.0
    for res in resolutions:
        unet = make_unet(res, device, dtype, args.width)
        compiled = None
        for batch in batches:
            shape = (batch, 3, res, res)
            sched = DDIMScheduler(num_train_timesteps=1000)  # clip_sample=True, leading, set_alpha_to_one
            pipe = DDIMPipeline(unet=unet, scheduler=sched)
            pipe.set_progress_bar_config(disable=True)
            sampler = fastdiff.DDIMSampler(steps=steps, eta=0.0, timestep_spacing="leading",
                                           prev_timestep_rule="ratio", clip_sample=True)

            def model(x, t):
                return unet(x, t, return_dict=False)[0]

            graphed = GraphedSampler(sampler, model)
            x_T = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device,
                              dtype=dtype)

            def scheduler_loop(net):
                sched.set_timesteps(steps)
                t_dev = sched.timesteps.to(device)  # a device timestep keeps the compiled UNet's graph whole
                x = x_T.clone()
                for i, t in enumerate(sched.timesteps):
                    x = sched.step(net(x, t_dev[i], return_dict=False)[0], t, x, eta=0.0).prev_sample
                return x

            gen = torch.Generator(device=device)
            variants = [
                ("diffusers DDIMPipeline", lambda: pipe(batch_size=batch, generator=gen.manual_seed(0), eta=0.0,
                                                        num_inference_steps=steps, output_type="pt",
                                                        return_dict=False)),
                ("fastdiff eager", lambda: sampler.sample(model, shape, seed=0, device=device, dtype=dtype)),
                ("fastdiff graphed", lambda: graphed(shape, seed=0, device=device, dtype=dtype)),
            ]
            with torch.no_grad():
                want = scheduler_loop(unet)
                diff = {"fastdiff eager": float((sampler.sample(model, x=x_T) - want).abs().max()),
                        "fastdiff graphed": float((graphed(x=x_T) - want).abs().max())}
                ctime = None
                if args.compile_mode != "none":
                    if compile_spent > args.compile_budget:
                        tab.add([batch, res, "torch.compile", "skipped (compile budget spent)", "-", "-", "-"])
                    else:
                        if compiled is None:
                            compiled = torch.compile(unet, mode=args.compile_mode, dynamic=False)
                        sync(device)
                        t0 = time.perf_counter()
                        got = scheduler_loop(compiled)
                        sync(device)
                        ctime = time.perf_counter() - t0
                        compile_spent += ctime
                        diff[f"torch.compile ({args.compile_mode})"] = float((got - want).abs().max())
                        variants.append((f"torch.compile ({args.compile_mode})", lambda: scheduler_loop(compiled)))
                times = {}
                for name, fn in variants:
                    times[name] = time_call(fn, device, min_time=args.min_time, batches=3, warmup=1)
            ref = times["diffusers DDIMPipeline"]
            for name, sec in times.items():
                d = diff.get(name)
                tab.add([batch, res, name, fmt_time(sec), f"{sec / steps * 1e3:.3f}", f"{ref / sec:.2f}x",
                         "-" if d is None else f"{d:.2e}"],
                        dict(batch=batch, resolution=res, loop=name, seconds=sec, ms_per_step=sec / steps * 1e3,
                             speedup=ref / sec, max_abs_diff=d, dtype=dname, steps=steps))
            if ctime is not None:
                tab.add([batch, res, "  torch.compile: first call (compile + record)", fmt_time(ctime), "-", "-", "-"],
                        dict(batch=batch, resolution=res, loop="compile", seconds=ctime))
            graphed.reset()
            if args.out:  # after every configuration: a run stopped at its time limit keeps its plot
                from plot_e2e import plot
                plot(Path(args.out) / "e2e.json", Path(args.out) / "e2e_speedup.png")
        del unet, compiled
        torch._dynamo.reset()
    tab.save(args.out, "e2e")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fastdiff.diffusers schedulers vs diffusers' own: per-step cost and a full pipeline run.

    python benchmarks/bench_diffusers.py                  # CUDA if present, else CPU
    python benchmarks/bench_diffusers.py --device cpu --threads 1

Per step (the scheduler alone, model output given): ``host`` is the time until ``step`` returns
(what the Python loop pays; on a GPU the launches are queued, not finished), ``device`` (GPU
only) is CUDA-event time per step over a loop of steps with a sync only at the end, i.e. the
throughput of the step stream. Pipeline: DDIMPipeline / DDPMPipeline with a tiny UNet2DModel
(random weights, built locally), 50 steps, the same generator. The two schedulers' runs alternate
and each keeps its fastest of ``--repeats`` (the figure a shared machine disturbs least).

Prints a markdown table with the device, versions, date and commit.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import os
import platform
import subprocess
import time

import torch


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_loop(scheduler, shape, device, dtype, steps, eta):
    """A closure running one loop of ``steps`` steps; returns (host µs/step, device µs/step or None)."""
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    m = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    kw = {"eta": eta} if eta is not None else {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # UniPC's step has none
        kw["generator"] = gen
    stateful = hasattr(scheduler, "step_index")  # counts its steps: a new loop needs set_timesteps
    for t in scheduler.timesteps[:3]:  # warm up: caches, lazy tables, kernel compilation
        scheduler.step(m, t, x, **kw)
    sync(device)

    def run():
        if stateful:
            scheduler.set_timesteps(steps, device=device)  # outside the timed steps
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        h = 0.0
        for t in scheduler.timesteps:
            t0 = time.perf_counter()
            scheduler.step(m, t, x, **kw)
            h += time.perf_counter() - t0
        dev = None
        if device.type == "cuda":
            end.record()
            end.synchronize()
            dev = start.elapsed_time(end) * 1e3 / steps
        return h * 1e6 / steps, dev

    return run


def pipeline_run(pipe, device, steps, **kw):
    """A closure running the pipeline once; returns (ms, images)."""
    def run():
        sync(device)
        t0 = time.perf_counter()
        out = pipe(generator=torch.Generator(device="cpu").manual_seed(0), num_inference_steps=steps,
                   output_type="pt", **kw).images
        sync(device)
        return (time.perf_counter() - t0) * 1e3, out

    return run


def interleaved(run_a, run_b, repeats):
    """Alternate the two runs (so load from other processes hits both alike); keep each one's best.
    The minimum is the figure least disturbed by a shared machine."""
    a, b = [], []
    for _ in range(repeats):
        a.append(run_a())
        b.append(run_b())
    return min(a, key=lambda r: r[0]), min(b, key=lambda r: r[0])


def main():
    import diffusers
    import triton  # noqa: F401  (version in the header)

    import fastdiff
    from fastdiff.diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                                    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                                    FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="1x4x64x64,8x4x64x64,1x3x32x32",
                   help="comma-separated sample shapes for the per-step table")
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--only", default=None, help="run only the step rows whose name contains this")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [torch.float32] + ([torch.float16] if device.type == "cuda" else [])

    print(f"# fastdiff.diffusers vs diffusers — {device_name(device)}")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, triton {triton.__version__}, "
          f"fastdiff {fastdiff.__version__} @ {commit()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
          + (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""))
    print()
    cases = [("DDIM eta=0", diffusers.DDIMScheduler, DDIMScheduler, 0.0),
             ("DDIM eta=1", diffusers.DDIMScheduler, DDIMScheduler, 1.0),
             ("DDPM fixed_small", diffusers.DDPMScheduler, DDPMScheduler, None),
             ("FlowMatch Euler", diffusers.FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, None),
             ("DPM++ 2M", diffusers.DPMSolverMultistepScheduler, DPMSolverMultistepScheduler, None),
             ("Euler", diffusers.EulerDiscreteScheduler, EulerDiscreteScheduler, None),
             ("Euler a", diffusers.EulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler, None),
             ("UniPC bh2 order 2", diffusers.UniPCMultistepScheduler, UniPCMultistepScheduler, None),
             ("UniPC order 3", functools.partial(diffusers.UniPCMultistepScheduler, solver_order=3),
              functools.partial(UniPCMultistepScheduler, solver_order=3), None)]
    wan = dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction")
    cases.append(("UniPC flow (Wan)", functools.partial(diffusers.UniPCMultistepScheduler, **wan),
                  functools.partial(UniPCMultistepScheduler, **wan), None))
    gpu = device.type == "cuda"
    print("| step | shape | dtype | diffusers host µs | fastdiff host µs | host speedup |"
          + (" diffusers device µs | fastdiff device µs | device speedup |" if gpu else ""))
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|---:|" if gpu else ""))
    for name, ref_cls, fast_cls, eta in cases:
        if args.only and args.only not in name:
            continue
        for shape in shapes:
            for dtype in dtypes:
                (ref_h, ref_d), (fast_h, fast_d) = interleaved(
                    step_loop(ref_cls(), shape, device, dtype, args.steps, eta),
                    step_loop(fast_cls(), shape, device, dtype, args.steps, eta), args.repeats)
                row = (f"| {name} | {'x'.join(map(str, shape))} | {str(dtype).replace('torch.', '')} | "
                       f"{ref_h:.1f} | {fast_h:.1f} | {ref_h / fast_h:.2f}x |")
                if gpu:
                    row += f" {ref_d:.1f} | {fast_d:.1f} | {ref_d / fast_d:.2f}x |"
                print(row, flush=True)

    if args.no_pipeline:
        return
    print()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4).to(device).eval()
    print(f"Pipeline: tiny UNet2DModel (16x16x3, {sum(p.numel() for p in unet.parameters())} parameters), "
          f"batch 4, {args.steps} steps, best of {args.repeats} alternating runs")
    print()
    print("| pipeline | diffusers ms | fastdiff ms | speedup | max abs image difference |")
    print("|---|---:|---:|---:|---:|")
    for name, pipe_cls, ref_cls, fast_cls, kw in (
            ("DDIMPipeline eta=0", diffusers.DDIMPipeline, diffusers.DDIMScheduler, DDIMScheduler, {"eta": 0.0}),
            ("DDIMPipeline eta=1", diffusers.DDIMPipeline, diffusers.DDIMScheduler, DDIMScheduler, {"eta": 1.0}),
            ("DDPMPipeline", diffusers.DDPMPipeline, diffusers.DDPMScheduler, DDPMScheduler, {})):
        ref = pipe_cls(unet=unet, scheduler=ref_cls())
        fast = pipe_cls(unet=unet, scheduler=ref_cls())
        fast.scheduler = fast_cls.from_config(fast.scheduler.config)  # the README's swap
        for pipe in (ref, fast):
            pipe.set_progress_bar_config(disable=True)
            pipeline_run(pipe, device, 3, batch_size=4, **kw)()  # warm up
        (ref_ms, a), (fast_ms, b) = interleaved(pipeline_run(ref, device, args.steps, batch_size=4, **kw),
                                                pipeline_run(fast, device, args.steps, batch_size=4, **kw),
                                                args.repeats)
        print(f"| {name} | {ref_ms:.1f} | {fast_ms:.1f} | {ref_ms / fast_ms:.2f}x | {(a - b).abs().max().item():.1e} |",
              flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""The `fastdiff` command line.

    fastdiff info                                   which backends are available and why
    fastdiff sample --sampler ocm-ddpm --steps 10 --out digits.png
                                                    digits from the packaged demo model, as a PNG grid
    torchrun --nproc-per-node 2 -m fastdiff.cli sample --num-samples 1024 --out digits.png
                                                    the same across 2 processes (each samples its part)
    fastdiff bench                                  the step microbenchmark: one fused step against
                                                    the same update as separate eager torch ops
    fastdiff bench --full [--quick]                 benchmarks/bench_step.py (from a source checkout)
    fastdiff --version                              (also: python -m fastdiff ...)

Errors in the arguments exit with status 2 and a message naming the constraint.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time


def _info(_args) -> int:
    from .info import report
    print(report())
    return 0


# ------------------------------------------------------------------------------------------
# sample


def _sample(args) -> int:
    import torch

    from . import demo

    if not args.out.lower().endswith(".png"):
        raise _UsageError(f"--out must name a .png file, got {args.out!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda was asked for but torch sees no CUDA device")
    _check_backend(args.backend, device)
    _check_grid(args.n, args.nrow, args.scale)
    _check_writable(args.out)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        return _sample_distributed(args, device)
    t0 = time.perf_counter()
    x = demo.sample(args.sampler, args.steps, args.n, seed=args.seed, eta=args.eta, device=device,
                    backend=args.backend, progress=not args.quiet and sys.stderr.isatty())
    if device.type == "cuda":
        torch.cuda.synchronize()
    _write_grid(args, x, time.perf_counter() - t0, str(device))
    return 0


def _write_grid(args, x, elapsed: float, where: str) -> None:
    from . import demo

    grid = demo.image_grid(x, nrow=args.nrow, scale=args.scale)
    demo.write_png(args.out, grid)
    print(f"wrote {args.out}: {args.n} samples, sampler {args.sampler}, {args.steps} steps, seed {args.seed}, "
          f"{grid.shape[1]}x{grid.shape[0]} px ({elapsed:.2f} s on {where})")


def _sample_distributed(args, device) -> int:
    """``fastdiff sample`` under torchrun: each rank samples its part of the batch and writes it next
    to --out (a filesystem every rank sees); rank 0 merges the parts in rank order into the PNG
    one process writes, and removes them. The progress bar is rank 0's."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from . import demo, distributed

    device = distributed.init_from_env(device.type)
    try:
        rank, size = distributed.world()
        model, sampler = demo.make_demo_sampler(args.sampler, args.steps, eta=args.eta, device=device,
                                                backend=args.backend)
        t0 = time.perf_counter()
        with torch.no_grad():
            mine = distributed.sample(model, (args.n,) + demo.IMAGE_SHAPE, sampler=sampler, seed=args.seed,
                                      device=device, gather=False, progress=True)
        stem = os.path.splitext(os.path.abspath(args.out))[0]
        parts = [f"{stem}.rank{r}-of-{size}.npy" for r in range(size)]
        np.save(parts[rank], mine.cpu().numpy())
        dist.barrier()  # every part is on disk
        if rank == 0:
            x = torch.from_numpy(np.concatenate([np.load(p) for p in parts]))
            for p in parts:
                os.remove(p)
            _write_grid(args, x, time.perf_counter() - t0, f"{device}, {size} ranks")
    finally:
        dist.destroy_process_group()
    return 0


def _check_backend(backend, device) -> None:
    """A --backend that cannot run on this device is a usage error, not a crash."""
    if backend is not None:
        from .engine.backend import resolve
        try:
            resolve(backend, device)
        except RuntimeError as exc:
            raise _UsageError(str(exc)) from None


# The PNG grid's longest side: 16384 px (256 MiB of greyscale at most), far above the defaults
# (64 digits at --scale 4: 265 px) and within what image viewers open.
MAX_GRID_SIDE = 16384


def _check_grid(n: int, nrow, scale: int) -> None:
    from .demo import IMAGE_SHAPE, grid_shape

    h, w = grid_shape(n, IMAGE_SHAPE[-2:], nrow, scale)
    if max(h, w) > MAX_GRID_SIDE:
        raise _UsageError(f"--n {n} --nrow {nrow or 'auto'} --scale {scale} would make a {w}x{h} px grid; its sides "
                          f"may be at most {MAX_GRID_SIDE} px: lower --scale, or choose --nrow near sqrt(--n)")


def _check_writable(path: str) -> None:
    """--out must be a file we can write, found out before sampling (not after a long run): opened
    for appending (which leaves an existing file as it is) and removed again if it was new."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise _UsageError(f"--out {path}: the directory {out_dir} does not exist")
    if os.path.isdir(path):
        raise _UsageError(f"--out {path} is a directory; name a .png file in it")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise _UsageError(f"--out {path} cannot be written ({exc.strerror or exc})") from None
    if not existed:
        os.remove(path)


# ------------------------------------------------------------------------------------------
# bench


def _timer(fn, device, repeat: int, warmup: int = 3) -> float:
    """Median seconds per call of ``fn``: CUDA events on a GPU (each call timed on the device),
    perf_counter around a synchronised call on the CPU."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _eager_ddpm_step(x, eps, z, a_t, s_t, c_x0, c_xt, std):
    """The DDPM update as a diffusers-style scheduler writes it: one torch op (one pass over
    memory) per line."""
    x0 = (x - s_t * eps) / a_t
    x0 = x0.clamp(-1.0, 1.0)
    mean = c_x0 * x0 + c_xt * x
    return mean + std * z


def _full_bench(args) -> int:
    """benchmarks/bench_step.py of the source tree this package runs from (an editable install or
    a checkout); an installed wheel has no benchmarks/, so this says so instead."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "bench_step.py")
    if not os.path.exists(path):
        raise _UsageError(f"--full runs benchmarks/bench_step.py from the fastdiff source tree, which is not "
                          f"next to this installed package ({root}); run it from a checkout, or drop --full "
                          "for the built-in step benchmark")
    spec = importlib.util.spec_from_file_location("fastdiff_bench_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(["--quick"] if args.quick else []) or 0)


def _bench(args) -> int:
    import torch

    if args.full:
        return _full_bench(args)

    from . import __version__
    from .engine.backend import resolve
    from .engine.step import StepOptions, step
    from .engine.tables import COLUMNS
    from .samplers import DDPMSampler

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda was asked for but torch sees no CUDA device")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    _check_backend(args.backend, device)
    backend = resolve(args.backend, device)
    sampler = DDPMSampler(None, 50, clip_sample=True)
    table, _, ids = sampler.device_state(device)
    index = ids[10]
    host_row = sampler.table.host[10]
    a_t, s_t, c_x0, c_xt, std = (float(host_row[COLUMNS.index(k)]) for k in ("a_t", "b_t", "c_x0", "c_xt", "std"))
    options = StepOptions(prediction_type="epsilon", clip_range=1.0)
    seed = torch.tensor([0], dtype=torch.int64, device=device)
    commit = _git_commit()
    print(f"fastdiff {__version__} step microbenchmark - {_device_name(device)}, torch {torch.__version__}, "
          f"{args.dtype}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
          + (f", commit {commit}" if commit else ""))
    print(f"fused: fastdiff.step (DDPM, clip, in-kernel Philox noise) on the {backend} backend; eager: the same update "
          "as separate torch ops with noise from torch.randn")
    print(f"{'shape':>20} {'elements':>10} {'fused ms':>9} {'eager ms':>9} {'speed-up':>8} {'fused GB/s':>10}")
    shapes = args.shape or _default_shapes(device)
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device, dtype=dtype)
        eps = torch.randn(shape, generator=g, device=device, dtype=dtype)
        out = torch.empty_like(x)

        def fused():
            step(x, eps, table, index, options, seed=seed, out=out, backend=backend)

        def eager():
            z = torch.randn_like(x)
            return _eager_ddpm_step(x, eps, z, a_t, s_t, c_x0, c_xt, std)

        t_fused = _timer(fused, device, args.repeat)
        t_eager = _timer(eager, device, args.repeat)
        moved = 3 * x.numel() * x.element_size()  # read x and eps, write out: the floor of a step
        print(f"{str(tuple(shape)):>20} {x.numel():>10} {t_fused * 1e3:>9.3f} {t_eager * 1e3:>9.3f} "
              f"{t_eager / t_fused:>7.2f}x {moved / t_fused / 1e9:>10.2f}")
    if device.type != "cuda":
        what = ("the fused C++ CPU step" if backend == "cpp" else "the plain-torch reference (not fused)")
        print(f"note: on the CPU the step runs {what}; the Triton kernel needs a CUDA device. The full benchmark "
              "(benchmarks/bench_step.py in the source tree) adds CUDA-graph loops and bandwidth against a device "
              "copy.")
    return 0


def _default_shapes(device):
    # Latent-diffusion sizes on a GPU (4-channel 64x64 and 128x128 latents, batch 16: 1 M and 4 M
    # elements); the demo's digits batch and one latent batch on the CPU, where it is slow.
    if device.type == "cuda":
        return [(16, 4, 64, 64), (16, 4, 128, 128), (8, 3, 256, 256)]
    return [(64, 1, 8, 8), (4, 4, 64, 64)]


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _git_commit() -> str:
    """The source tree's commit when run from a checkout, else '' (an installed package has none)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


# ------------------------------------------------------------------------------------------
# argument parsing


class _UsageError(Exception):
    """A bad argument found after parsing; reported like an argparse error (exit status 2)."""


def _positive_int(name, lo=1, hi=None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {v}")
        return v
    return parse


def _nonneg_float(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not v >= 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text}")
        return v
    return parse


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must look like 8x4x64x64, got {text!r}") from None
    if not shape or len(shape) > 4 or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--shape must have 1 to 4 positive sizes, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import DEMO_SAMPLERS

    parser = argparse.ArgumentParser(prog="fastdiff", description="fast diffusion sampling",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are available and why").set_defaults(func=_info)

    p = sub.add_parser("sample", help="sample digits from the packaged demo model into a PNG grid")
    p.add_argument("--sampler", choices=DEMO_SAMPLERS, default="ocm-ddpm",
                   help="student: the progressively distilled student (2 or 4 steps); consistency: the "
                        "consistency-distilled model; the others run the demo UNet (default: ocm-ddpm)")
    p.add_argument("--steps", type=_positive_int("--steps", 1, 1000), default=10, help="sampling steps (default 10)")
    # --num-samples: the spelling torchrun passes on (its parser takes --n for an abbreviation of its own)
    p.add_argument("--n", "--num-samples", dest="n", type=_positive_int("--n", 1, 4096), default=64,
                   help="number of digits (default 64)")
    p.add_argument("--seed", type=_positive_int("--seed", 0, 2**63 - 1), default=0)
    p.add_argument("--eta", type=_nonneg_float("--eta"), default=0.0, help="DDIM stochasticity (ddim, ocm-ddim)")
    p.add_argument("--out", default="digits.png", help="PNG file to write (default digits.png)")
    p.add_argument("--nrow", type=_positive_int("--nrow", 1, 4096), default=None,
                   help="images per grid row (default: about sqrt(--n))")
    p.add_argument("--scale", type=_positive_int("--scale", 1, 64), default=4, help="pixel upscaling (default 4)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", choices=("torch", "triton"), default=None,
                   help="force the step backend (default: triton on CUDA, torch on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only on a terminal)")
    p.set_defaults(func=_sample)

    b = sub.add_parser("bench", help="step microbenchmark: fused step vs eager torch ops")
    b.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    b.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    b.add_argument("--shape", type=_shape, action="append", help="tensor shape, e.g. 16x4x64x64 (repeatable)")
    b.add_argument("--repeat", type=_positive_int("--repeat"), default=20)
    b.add_argument("--backend", choices=("torch", "triton"), default=None)
    b.add_argument("--full", action="store_true",
                   help="run the full benchmarks/bench_step.py instead (source checkouts only)")
    b.add_argument("--quick", action="store_true", help="with --full: three sizes, fp32 only")
    b.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return args.func(args)
    except (_UsageError, ValueError, FileNotFoundError) as exc:
        # Usage errors only: a real failure (e.g. CUDA out of memory) keeps its traceback.
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel scaling of fastdiff.distributed.sample: samples per second at 1 and 2 (or more)
processes under torchrun, all measured in one run, on the packaged demo UNet (8x8 digits).

    python benchmarks/bench_distributed.py                       # CPU: 1 and 2 processes, 1 thread each
    python benchmarks/bench_distributed.py --device cuda --procs 1 2 4 --samples 8192

Each configuration is one ``torchrun --standalone --nproc-per-node P`` of this file in worker
mode. A worker loads the model, samples once to warm up, then times ``--repeat`` calls of
``fastdiff.distributed.sample`` (the all-gather included) between barriers; rank 0 reports the
median. On the CPU every process gets one thread, so P processes use P cores; the row
"1 process, P threads" is what one process makes of the same cores with intra-op threads.
The load average of the machine is printed with the table (other jobs on shared cores move
every figure).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import fastdiff.distributed as fdd
    from fastdiff import demo

    torch.set_num_threads(args.threads)
    device = fdd.init_from_env(args.device)
    rank, size = fdd.world()
    model, sampler = demo.make_demo_sampler(args.sampler, args.steps, device=device)
    shape = (args.n,) + demo.IMAGE_SHAPE
    times = []
    with torch.no_grad():
        fdd.sample(model, shape, sampler=sampler, seed=0, device=device)  # warm-up
        for i in range(args.repeat):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fdd.sample(model, shape, sampler=sampler, seed=i + 1, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            times.append(time.perf_counter() - t0)
    if rank == 0:
        print("RESULT " + json.dumps({"procs": size, "threads": args.threads, "seconds": statistics.median(times)}))
    dist.destroy_process_group()


def run(procs: int, threads: int, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           os.path.abspath(__file__), "--worker", "--threads", str(threads), "--device", args.device,
           "--sampler", args.sampler, "--steps", str(args.steps), "--samples", str(args.n),
           "--repeat", str(args.repeat)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=10)
    # not --n: torchrun's parser would take it for an abbreviation of one of its own options
    p.add_argument("--samples", dest="n", type=int, default=512, help="samples per call (the whole batch)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    rows = [run(procs, 1, args) for procs in args.procs]
    if args.device == "cpu" and max(args.procs) > 1:
        rows.append(run(1, max(args.procs), args))
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    where = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"fastdiff.distributed.sample data-parallel scaling - {where}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {_commit()}, "
          f"load average {' '.join(f'{v:.1f}' if isinstance(v, float) else v for v in load)}")
    print(f"demo UNet, {args.sampler} {args.steps} steps, {args.n} samples per call, gloo/nccl all-gather included, "
          f"median of {args.repeat}")
    base = rows[0]["seconds"]
    print(f"{'processes':>9} {'threads':>7} {'s / call':>9} {'samples/s':>10} {'speed-up':>8}")
    for r in rows:
        print(f"{r['procs']:>9} {r['threads']:>7} {r['seconds']:>9.3f} {args.n / r['seconds']:>10.1f} "
              f"{base / r['seconds']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

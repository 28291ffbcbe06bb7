"""Sample quality of DDPM, DDIM (eta = 0), OCM-DDPM and OCM-DDIM on the analytic test bed.

Two mixtures of tight diagonal Gaussians (per-dimension stds log-uniform in [0.005, 0.3]):
one in 2 dimensions, one in 256. Each sampler runs with the exact network; the OCM samplers
with the exact head h = sigma_t^2 diag nabla^2 log p_t and with an MLP head trained by
covariance matching (fastdiff.training.ocm.train_head, the exact eps network frozen). Metrics against
exact samples of p_0: Frechet distance of fitted Gaussians (FD), sliced Wasserstein-2 (SW2),
per-mode weight error (total variation of the mode occupancies). The row "exact" compares two
independent exact sample sets: the noise floor of each metric. On the 2-d mixture OCM-DDPM
also runs with the training-free head (8 Rademacher probes of the eps network per step).

Timesteps use "linspace" spacing (999 ... 0) so the last step starts at t = 0 for every K; with
"trailing" spacing the final step returns E[x0 | x_t] from t = 1000/K - 1, which dominates the
error at small K for every sampler alike.

    python benchmarks/quality.py                 # full run: table, PNGs, notes/ocm_results.md
    python benchmarks/quality.py --quick         # smaller sample sets and training, for a smoke test
    torchrun --nproc-per-node 2 benchmarks/quality.py    # the sample sets drawn by 2 processes

Under torchrun every sample set is split across the ranks (fastdiff.distributed.sample) and
gathered; rank 0 trains the heads (the others receive its weights), logs, and writes the files.
The rows with exact networks and heads equal a one-process run's (checked with --quick). The
trained-head rows change from run to run in any case (the head's initial weights come from
torch's unseeded global generator), and the probe head draws its Rademacher probes from a
generator per process, so its rows differ from a one-process run's by sampling noise.

CPU, torch backend; runs in a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import fastdiff
import fastdiff.distributed as fdd
from requires import require
from fastdiff.training.ocm import MLPHead, ProbeHead, train_head
from fastdiff.testbed import GaussianMixture, frechet_distance, mode_weight_error, sliced_wasserstein

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = (5, 10, 25, 50, 100)
METRICS = ("FD", "SW2", "mode err")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def metrics(gm, ref, x):
    return (frechet_distance(ref, x), sliced_wasserstein(ref, x, n_projections=128), mode_weight_error(gm, x))


def sample(sampler, model, shape):
    """All ``shape[0]`` samples, split across the ranks when run under torchrun."""
    if dist.is_initialized():
        return fdd.sample(model, shape, sampler=sampler, seed=0)
    return sampler.sample(model, shape, seed=0)


def train(gm, steps, hidden, log):
    head = MLPHead(gm.dim, gm.schedule, hidden=hidden)
    if dist.is_initialized() and dist.get_rank() != 0:  # rank 0 trains; the others take its weights
        for t in head.state_dict().values():
            dist.broadcast(t, 0)
        return head, float("nan"), 0.0, None
    t0 = time.perf_counter()
    hist = train_head(head, gm.model(), gm.sample_x0, gm.schedule, steps=steps, batch_size=256, lr=2e-3,
                      log_every=max(steps // 4, 1), callback=lambda s, l: log(f"    head step {s}: loss {l:.4g}"))
    # Held-out accuracy: relative MSE against the exact h over t uniform, x_t ~ p_t.
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, gm.schedule.num_train_timesteps, (2000,), generator=g)
    _, xt, _ = gm.sample_xt(2000, t, g)
    with torch.no_grad():
        pred = head(xt.float(), t).double()
    exact = gm.h(xt, t)
    rel = float(((pred - exact) ** 2).mean() / exact.var())
    if dist.is_initialized():
        for v in head.state_dict().values():
            dist.broadcast(v, 0)
    return head, rel, time.perf_counter() - t0, hist


def run_mixture(name, gm, n, head_steps, hidden, log):
    log(f"\n== {name}: {gm} , {n} samples")
    ref = gm.sample_x0(n, torch.Generator().manual_seed(1)).float()
    floor = metrics(gm, ref, gm.sample_x0(n, torch.Generator().manual_seed(2)).float())
    head, rel, t_train, _ = train(gm, head_steps, hidden, log)
    log(f"  trained head: relative MSE vs exact h {rel:.4f} ({head_steps} steps, {t_train:.0f} s)")
    trained = lambda x, t: head(x, t).detach()  # noqa: E731  (sampling needs no graph)
    configs = [
        ("DDPM", "ddpm", gm.model(), {}),
        ("DDIM", "ddim", gm.model(), {"eta": 0.0}),
        ("OCM-DDPM exact", "ocm-ddpm", gm.model(return_h=True), {}),
        ("OCM-DDIM exact", "ocm-ddim", gm.model(return_h=True), {"eta": 0.0}),
        ("OCM-DDPM trained", "ocm-ddpm", gm.model(), {"head": trained}),
        ("OCM-DDIM trained", "ocm-ddim", gm.model(), {"head": trained, "eta": 0.0}),
    ]
    if gm.dim <= 16:  # the training-free head costs 1 + probes model passes per step: low-dim only
        probe = ProbeHead(gm.model(), gm.schedule, probes=8)
        configs.append(("OCM-DDPM probes", "ocm-ddpm", gm.model(), {"head": probe}))
    results = {}
    for label, sampler, model, kw in configs:
        for k in STEPS:
            t0 = time.perf_counter()
            s = fastdiff.make_sampler(sampler, gm.schedule, k, timestep_spacing="linspace", backend="torch", **kw)
            with torch.no_grad():
                x = sample(s, model, (n, gm.dim))
            results[(label, k)] = metrics(gm, ref, x)
            log(f"  {label:17s} K={k:3d}  FD {results[(label, k)][0]:.4g}  SW2 {results[(label, k)][1]:.4g}  "
                f"mode {results[(label, k)][2]:.4f}  ({time.perf_counter() - t0:.1f} s)")
    return {"floor": floor, "results": results, "labels": [c[0] for c in configs], "head_rel": rel,
            "head_steps": head_steps}


def table_md(name, res):
    lines = [f"### {name}", "",
             f"Trained head: relative MSE vs the exact h = {res['head_rel']:.4f} after {res['head_steps']} "
             "steps (0 = exact, ~1 = the constant h = -1).", ""]
    for mi, metric in enumerate(METRICS):
        lines.append(f"{metric} (exact vs exact: {res['floor'][mi]:.4g})")
        lines.append("")
        lines.append("| sampler | " + " | ".join(f"K={k}" for k in STEPS) + " |")
        lines.append("|---|" + "---|" * len(STEPS))
        for label in res["labels"]:
            vals = [res["results"][(label, k)][mi] for k in STEPS]
            lines.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(name, res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"DDPM": "C0-", "DDIM": "C1-", "OCM-DDPM exact": "C2-", "OCM-DDIM exact": "C3-",
              "OCM-DDPM trained": "C2--", "OCM-DDIM trained": "C3--", "OCM-DDPM probes": "C4:"}
    for mi, (ax, metric) in enumerate(zip(axes, METRICS)):
        for label in res["labels"]:
            ax.plot(STEPS, [max(res["results"][(label, k)][mi], 1e-6) for k in STEPS], styles[label], marker="o",
                    ms=3, label=label)
        ax.axhline(max(res["floor"][mi], 1e-6), color="k", ls=":", label="exact vs exact")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(STEPS)
        ax.set_xticklabels([str(k) for k in STEPS])
        ax.set_xlabel("sampling steps K")
        ax.set_title(f"{metric}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sample sets and short head training")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the ops are small and a loaded 2-core machine ran "
                        "the head training ~10x slower with 2)")
    p.add_argument("--out", default=os.path.join(ROOT, "notes", "ocm_results.md"))
    args = p.parse_args(argv)
    require("benchmarks/quality.py", "matplotlib")  # the plots come after minutes of sampling
    torch.set_num_threads(args.threads)
    rank, size = 0, 1
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        fdd.init_from_env("cpu")
        rank, size = fdd.world()
    start = time.perf_counter()
    lines = []

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    q = args.quick
    cases = [
        ("2-d mixture, 4 modes", GaussianMixture.random(2, 4, seed=1), 1000 if q else 4000, 300 if q else 1500, 128),
        ("256-d mixture, 8 modes", GaussianMixture.random(256, 8, seed=2), 500 if q else 1000, 200 if q else 800, 256),
    ]
    env = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}, "
           f"CPU ({platform.processor() or platform.machine()}, {size} process(es) of {args.threads} thread(s)), "
           f"torch {torch.__version__}, "
           f"fastdiff {fastdiff.__version__}, backend torch, linear schedule (1000 steps), linspace spacing, "
           f"sampler seed 0{', --quick' if q else ''}")
    lines += ["## OCM sample quality on the analytic test bed (benchmarks/quality.py)", "", env, "",
              "Mixtures: `GaussianMixture.random(dim, modes, std_range=(0.005, 0.3))`, means uniform in [-0.7, 0.7]. "
              "FD = Frechet distance of fitted Gaussians, SW2 = sliced Wasserstein-2 (128 directions), "
              "mode err = total variation between mode weights and sample occupancies. One sampler seed; "
              "differences smaller than the exact-vs-exact row are noise.", ""]
    for name, gm, n, head_steps, hidden in cases:
        res = run_mixture(name, gm, n, head_steps, hidden, log)
        if rank != 0:
            continue
        md = table_md(name, res)
        print("\n" + md)
        lines += [md, ""]
        tag = "2d" if gm.dim == 2 else f"{gm.dim}d"
        png = os.path.join(HERE, f"quality_{tag}.png")
        plot(f"{name} ({env.split(',')[0]})", res, png)
        lines += [f"Plot: benchmarks/quality_{tag}.png", ""]
    total = time.perf_counter() - start
    if size > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    lines.append(f"Total run time {total:.0f} s.")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

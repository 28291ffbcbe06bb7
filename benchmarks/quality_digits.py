"""Sample quality against step count on the packaged demo model (8x8 digits), and the distilled
student against DDIM on the analytic test bed.

    python benchmarks/quality_digits.py [--n 1000] [--out notes/demo_results.md] [--plot benchmarks/quality_digits.png]

Digits: for DDPM, DDIM (eta = 0), OCM-DDPM, OCM-DDIM (eta = 0; the packaged covariance head), the
progressively distilled student (DDIM at the 2 and 4 steps it was trained for) and the
consistency-distilled model (multistep consistency sampler), ``--n`` samples per entry give
* FD: the Frechet distance between Gaussians fitted to the packaged classifier's 64-d penultimate
  features of the samples and of all 1797 real digits (lower is better; the first row, real
  digits, shows the floor for this sample count);
* TV: the total-variation distance between the classifier's predicted class histogram of the
  samples and the real class frequencies;
* conf: the classifier's mean top-class probability.
Test bed: a 2-d, 4-mode Gaussian mixture (exact network as the teacher, an MLP student distilled
8 -> 4 -> 2 steps), FD and sliced Wasserstein-2 against exact samples.

Every table is printed with the device, torch version, date and commit, and written to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastdiff import demo  # noqa: E402
from fastdiff.testbed import frechet_distance, sliced_wasserstein  # noqa: E402
from requires import require  # noqa: E402

STEPS = (1, 2, 4, 8, 16, 32)
SAMPLERS = ("ddpm", "ddim", "ocm-ddpm", "ocm-ddim", "student", "consistency", "dpmpp-2m", "unipc", "euler")


def _fd_from_stats(feats: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> float:
    f = feats.double()
    mu_a, cov_a = f.mean(0), torch.cov(f.T)
    w, v = torch.linalg.eigh(cov_a)
    sa = (v * w.clamp(min=0).sqrt()) @ v.T
    w2, v2 = torch.linalg.eigh(sa @ cov.double() @ sa)
    cross = w2.clamp(min=0).sqrt().sum()
    return float((mu_a - mu.double()).square().sum() + cov_a.trace() + cov.double().trace() - 2 * cross)


def digit_metrics(x: torch.Tensor, clf, extra, class_freq):
    with torch.no_grad():
        feats = clf.features(x)
        prob = torch.softmax(clf.head(feats), dim=1)
    hist = prob.argmax(1).bincount(minlength=10).double() / x.shape[0]
    tv = 0.5 * float((hist - torch.tensor(class_freq, dtype=torch.float64)).abs().sum())
    return _fd_from_stats(feats, extra["real_mu"], extra["real_cov"]), tv, float(prob.max(1).values.mean())


def digits_table(n: int, seed: int, samplers=SAMPLERS, steps_list=STEPS):
    clf, info, extra = demo.load("demo_classifier")
    rows = []
    real, _ = demo.load_digits()
    pick = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    rows.append(("real digits", "-", *digit_metrics(real[pick], clf, extra, info["class_freq"]), 0.0))
    for sampler in samplers:
        for steps in steps_list:
            if sampler == "student" and steps not in demo.STUDENT_ASSETS:
                continue
            t0 = time.perf_counter()
            x = demo.sample(sampler, steps, n, seed=seed)
            dt = time.perf_counter() - t0
            rows.append((sampler, steps, *digit_metrics(x, clf, extra, info["class_freq"]), dt))
            print(f"{sampler:>12} {steps:>3} steps  FD {rows[-1][2]:8.3f}  TV {rows[-1][3]:.3f}  "
                  f"conf {rows[-1][4]:.3f}  ({dt:.1f} s)", flush=True)
    return rows


def testbed_table(iters: int, seed: int):
    from fastdiff import sample
    from fastdiff.training.distill import MLPDenoiser, ProgressiveDistillation
    from fastdiff.testbed import GaussianMixture

    torch.manual_seed(seed)
    mix = GaussianMixture.random(dim=2, n_components=4, std_range=(0.05, 0.2), seed=1, schedule="squaredcos_cap_v2")

    class Exact(torch.nn.Module):
        def forward(self, x, t):
            return mix.predict(x.double(), t, "v_prediction").to(x.dtype)

    teacher, student = Exact(), MLPDenoiser(2, hidden=128)
    pd = ProgressiveDistillation(teacher, student, mix.schedule, teacher_prediction_type="v_prediction",
                                 teacher_steps=16, final_steps=2, iters_per_round=iters, batch_size=256, lr=3e-3,
                                 seed=seed)
    students = {}

    def keep(rec):  # the student at the end of each round, with the sampler for its step count
        if rec["iteration"] == iters:
            students[rec["steps"]] = (copy.deepcopy(student).eval(), rec["steps"])

    pd.fit(lambda k, g: mix.sample_x0(k, g).float(), callback=keep)
    ref = mix.sample_x0(5000, torch.Generator().manual_seed(99)).float()
    rows = []
    with torch.no_grad():
        for steps in (2, 4, 8):
            x = sample(teacher, (5000, 2), sampler="ddim", steps=steps, schedule=mix.schedule,
                       prediction_type="v_prediction", seed=seed + 1)
            rows.append(("ddim, exact network", steps, frechet_distance(x, ref), sliced_wasserstein(x, ref)))
            model, _ = students[steps]
            ts = pd.base_timesteps[:: pd.teacher_steps // steps]
            x = sample(model, (5000, 2), sampler="ddim", steps=None, timesteps=ts, schedule=mix.schedule,
                       prediction_type="v_prediction", seed=seed + 1)
            rows.append(("distilled student", steps, frechet_distance(x, ref), sliced_wasserstein(x, ref)))
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "?"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    real_fd = rows[0][2]
    for sampler in SAMPLERS:
        pts = [(r[1], r[2], r[3]) for r in rows[1:] if r[0] == sampler]
        style = "o-" if len(pts) > 2 else "s--"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=sampler)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=sampler)
    axes[0].axhline(real_fd, color="grey", lw=0.8, ls=":", label="real digits (floor)")
    for ax, name in zip(axes, ("Frechet distance (classifier features)", "class-histogram TV distance")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fastdiff demo model (8x8 digits): quality vs steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="samples per entry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--testbed-iters", type=int, default=600, help="distillation iterations per round on the test bed")
    p.add_argument("--out", default="notes/demo_results.md")
    p.add_argument("--plot", default="benchmarks/quality_digits.png")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated subset of the demo samplers")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="comma-separated step counts")
    p.add_argument("--no-testbed", action="store_true", help="skip the distillation test bed")
    args = p.parse_args(argv)
    require("benchmarks/quality_digits.py", "sklearn", *(("matplotlib",) if args.plot else ()))
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
              f"commit {_commit()}")
    print(header)
    rows = digits_table(args.n, args.seed, args.samplers.split(","), [int(v) for v in args.steps.split(",")])
    bed = [] if args.no_testbed else testbed_table(args.testbed_iters, args.seed)
    lines = [f"## Demo model quality vs steps ({args.n} samples per entry, seed {args.seed})", "", header, "",
             "| sampler | steps | FD (features) | class TV | mean conf | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f} |" for r in rows]
    if bed:
        lines += ["", f"## Test bed: distilled student vs DDIM (2-d 4-mode mixture, {args.testbed_iters} iterations "
              "per round, 16 -> 2 steps, 5000 samples)", "", "| sampler | steps | FD | sliced W2 |", "|---|---:|---:|---:|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} |" for r in bed]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

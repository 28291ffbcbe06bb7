"""Solver error vs steps on the analytic test bed: every native sampler of the registry, VP and
flow, with the exact network of a Gaussian mixture, on two grids of noise levels.

Measurements per solver, grid and step count K (5, 10, 25):

* ODE err (deterministic solvers only): the RMS per coordinate of x0 minus the converged
  solution of the probability-flow ODE from the same initial noise. Every sampler draws x_T from
  the seed with the same Philox stream (``Sampler.initial_noise``: sigma-space Euler multiplies
  the same z by its init_noise_sigma), so one seed is one z; the reference is DDIM (VP) / flow
  Euler (flow) with 1000 steps from that z, and DPM-Solver++(2M) with 1000 steps differs from it
  by the "reference check" (an upper estimate of the reference's own error). Sigma-space Euler
  starts at x_T = sigma_max z, the VP point z sigma_max / sqrt(sigma_max^2 + 1) = z (1 - 2e-5);
  the "Euler start" figure is what that offset alone moves.
* mode switch: the fraction of samples whose mode (``GaussianMixture.assign``) differs from the
  reference's, and same-mode err: the ODE err over the other samples. Near a boundary between
  modes the ODE's map is nearly discontinuous: a sample that lands in another mode adds a
  distance between means to the RMS (on the 2-d mixture most of it at small K; in 64-d one such
  sample in 2000 moves the RMS by ~0.01, which is why the 1000-step reference check can be that
  large there while its same-mode part is not).
* FD (Frechet distance of fitted Gaussians) and SW2 (sliced Wasserstein-2, 128 directions)
  against exact samples of p_0, for every solver; "exact vs exact" is each metric's floor.
  Deterministic or not is measured: two runs from the same x_T with seeds 0 and 1.

The exact network is evaluated at the noise level the sampler assigns to the step: ``gm.model()``
for integer-timestep samplers on their own alpha_bar (ddim, ddpm), ``SampledSigmaModel`` for the
samplers with a sigma table (DPM-Solver++, Euler; their Karras / exponential sigmas fall between
the integer timesteps the model is called with), ``gm.flow_model()`` on the flow path.

Grids. quality.py's docstring: when the last node before sigma = 0 is t = 1000/K - 1, the final
step returns E[x0 | x_t] from there, which dominates the error at small K for every sampler.
Which grid is fair depends on the solver, so there are two:

* VP "linspace": each solver's own timestep_spacing="linspace", diffusers' rule for it: DDIM,
  DDPM and Euler end at t = 0; DPM-Solver++ (and UniPC) use linspace(0, 999, K + 1) without the
  0, whose last node is t = 999/K. The row "dpmpp-2m, DDIM's nodes" runs DPM-Solver++ on DDIM's
  timesteps (999 ... 0) as ``timesteps=``.
* VP "log-SNR": nodes uniform in lambda = log(alpha/sigma) from t = 999 to t = 0 (the exponential
  sigmas of diffusers' ``use_exponential_sigmas=True``, Karras' sigma space); a solver that takes
  that option runs on those sigmas, one that does not (DDIM, DDPM) on the rounded timesteps
  (``timesteps=``).
* flow "linear": sigmas linspace(0.999, 1/1000, K) then 0, FlowMatchEuler's default spacing
  started below 1 (flow-dpmpp-2m cannot start at sigma = 1, where lambda = log((1 - sigma)/sigma)
  is -inf; 0.999 is where diffusers' DPM flow sigmas start). The row "flow-dpmpp-2m, diffusers'
  flow sigmas" runs it on linspace(0.999, 0, K + 1) without the 0 (use_flow_sigmas, shift 1).
* flow "log-SNR": sigmas uniform in lambda between 0.999 and 1/1000, then 0.

The solvers are the names in VP_SOLVERS / FLOW_SOLVERS found in ``fastdiff.SAMPLERS``; a name
not registered yet (unipc, flow-unipc) is skipped with a line saying so, and included as soon as
it is registered (with its grid options as above; one it cannot take is reported, not run).

    python benchmarks/quality_solvers.py            # full run: tables, PNG, section of RESULTS.md
    python benchmarks/quality_solvers.py --quick    # smaller sample sets, a smoke test

CPU, torch backend, one thread; a few minutes on the 2-core VM.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

import fastdiff
from fastdiff.engine.schedule import FlowSchedule, Schedule
from fastdiff.testbed import GaussianMixture, frechet_distance, sliced_wasserstein
from quality_report import environment, finish, parse_args, save_figure, steps_axes
from requires import require

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = (5, 10, 25)
REF_STEPS = 1000
SECTION = "## Solver error vs steps on the analytic test bed (benchmarks/quality_solvers.py)"

# The solvers, by registry name; names not registered are skipped (and say so).
VP_SOLVERS = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "euler", "euler-a", "unipc")
FLOW_SOLVERS = ("flow-euler", "flow-ddim", "flow-dpmpp-2m", "flow-dpmpp-2m-sde", "flow-stochastic", "flow-unipc")
# Rows of a solver: (label suffix, keywords); a name not listed runs once with its defaults.
OPTIONS = {
    "ddim": [("", {"eta": 0.0})],
    "flow-ddim": [(" (eta 0)", {"eta": 0.0}), (" (eta 1)", {"eta": 1.0})],
}
FLOW_SIGMA_MAX, FLOW_SIGMA_MIN = 0.999, 1e-3
GRIDS = {"vp": ("linspace", "log-SNR"), "flow": ("linear", "log-SNR")}
METRICS = ("ODE err", "same-mode err", "mode switch", "FD", "SW2")
TABLES = (METRICS[:3], METRICS[3:])  # the ODE table and the distribution table of a grid


class SampledSigmaModel(torch.nn.Module):
    """The exact epsilon network at the noise level ``sampler`` assigns to each of its steps
    (its ``sigmas``, sigma space: alpha_bar = 1 / (sigma^2 + 1)), whatever timestep it passes the
    model: Euler's float timesteps, or the integer ones DPM-Solver rounds its Karras / exponential
    sigmas to. The input is x_t on the VP path (Euler's scaled input x / sqrt(sigma^2 + 1) is)."""

    def __init__(self, gm: GaussianMixture, sampler):
        super().__init__()
        ts = np.asarray(sampler.timesteps, dtype=np.float64)
        if len(np.unique(ts)) != len(ts):
            raise ValueError(f"{sampler.name}: repeated timesteps {ts.tolist()} do not name one sigma each")
        self.gm = gm
        self.timesteps = torch.tensor(ts)
        self.sigmas = torch.tensor(np.asarray(sampler.sigmas[: len(ts)], dtype=np.float64))

    def forward(self, x, t):
        sigma = self.sigmas[(t.double()[:, None] - self.timesteps[None]).abs().argmin(1)]
        return self.gm.eps(x, alpha_bar=1.0 / (1.0 + sigma * sigma))


def log_snr_timesteps(schedule: Schedule, k: int) -> np.ndarray:
    """K integer timesteps from 999 to 0 nearest to lambda uniform (sigma = sqrt((1 - ab)/ab)
    log-uniform between its values at t = 999 and t = 0; log-sigma interpolated in t)."""
    ab = schedule.alphas_cumprod.numpy()
    log_sigma = np.log(np.sqrt((1 - ab) / ab))
    target = np.linspace(log_sigma[-1], log_sigma[0], k)
    ts = np.round(np.interp(target, log_sigma, np.arange(len(ab)))).astype(np.int64)
    if len(np.unique(ts)) != k:
        raise ValueError(f"{k} log-SNR nodes round to repeated timesteps: {ts.tolist()}")
    return ts


def log_snr_flow_sigmas(k: int, hi: float = FLOW_SIGMA_MAX, lo: float = FLOW_SIGMA_MIN) -> list:
    """K flow sigmas from ``hi`` to ``lo``, uniform in lambda = log((1 - sigma) / sigma)."""
    lam = np.linspace(np.log((1 - hi) / hi), np.log((1 - lo) / lo), k)
    return list(1.0 / (1.0 + np.exp(lam)))


def rms(a, b) -> float:
    """RMS per coordinate of a - b."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def build(name, schedule, k, grid, kw):
    """(sampler, note) on ``grid``; (None, why) when the sampler takes none of its options."""
    attempts = []
    if grid == "linspace":
        attempts = [dict(timestep_spacing="linspace")]
    elif grid == "log-SNR" and not isinstance(schedule, FlowSchedule):
        attempts = [dict(use_exponential_sigmas=True), dict(timesteps=log_snr_timesteps(schedule, k))]
    elif grid == "log-SNR":
        attempts = [dict(sigmas=log_snr_flow_sigmas(k))]
    elif grid == "linear":
        attempts = [dict(sigmas=list(np.linspace(FLOW_SIGMA_MAX, FLOW_SIGMA_MIN, k)))]
    for grid_kw in attempts:
        steps = None if ("timesteps" in grid_kw or "sigmas" in grid_kw) else k
        try:
            s = fastdiff.make_sampler(name, schedule, steps, backend="torch", **grid_kw, **kw)
        except TypeError:
            continue
        note = "rounded nodes (timesteps=)" if "timesteps" in grid_kw and grid == "log-SNR" else ""
        return s, note
    return None, f"takes none of {[sorted(a) for a in attempts]}"


def run_path(gm, path, n, log):
    """Every solver of one path on one mixture, both grids."""
    flow = path == "flow"
    schedule = FlowSchedule() if flow else Schedule()
    ref_x0 = gm.sample_x0(n, torch.Generator().manual_seed(1)).float()
    other = gm.sample_x0(n, torch.Generator().manual_seed(2)).float()
    floor = (frechet_distance(ref_x0, other), sliced_wasserstein(ref_x0, other, n_projections=128))

    def model_for(s):
        if flow:
            return gm.flow_model(schedule)
        return SampledSigmaModel(gm, s) if hasattr(s, "sigmas") else gm.model()

    def run(s, seed=0, x=None):
        with torch.no_grad():
            out = s.sample(model_for(s), None if x is not None else (n, gm.dim), x=x, seed=seed)
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError(f"{s.name}: non-finite samples")
        return out

    t0 = time.perf_counter()
    ref_grid = dict(sigmas=list(np.linspace(FLOW_SIGMA_MAX, FLOW_SIGMA_MIN, REF_STEPS))) if flow else \
        dict(timesteps=schedule.timesteps(REF_STEPS, "linspace"))
    ref_name, check_name = ("flow-euler", "flow-dpmpp-2m") if flow else ("ddim", "dpmpp-2m")
    ode_ref = run(fastdiff.make_sampler(ref_name, schedule, None, backend="torch", **ref_grid))
    ref_modes = gm.assign(ode_ref)

    def ode_errors(x):
        """(RMS, RMS over the samples in the reference's mode, fraction in another mode)."""
        same = gm.assign(x) == ref_modes
        return rms(x, ode_ref), rms(x[same], ode_ref[same]), float((~same).double().mean())

    ref_check = ode_errors(run(fastdiff.make_sampler(check_name, schedule, None, backend="torch", **ref_grid)))
    log(f"  reference: {ref_name} {REF_STEPS} steps; {check_name} {REF_STEPS} steps differs by RMS {ref_check[0]:.3g}, "
        f"{ref_check[1]:.3g} in the same mode, {ref_check[2]:.2%} in another ({time.perf_counter() - t0:.1f} s)")
    extras = {"ref": f"{ref_name} {REF_STEPS} steps", "check": f"{check_name} {REF_STEPS} steps",
              "ref_check": ref_check}
    names = [m for m in (FLOW_SOLVERS if flow else VP_SOLVERS) if m in fastdiff.SAMPLERS]
    skipped = [m for m in (FLOW_SOLVERS if flow else VP_SOLVERS) if m not in names]
    for m in skipped:
        log(f"  skipped {m!r}: not registered in fastdiff.SAMPLERS")
    tables = {}
    for grid in GRIDS[path]:
        configs = [(name + suffix, name, kw, None) for name in names for suffix, kw in OPTIONS.get(name, [("", {})])]
        if grid == "linspace" and "dpmpp-2m" in names:
            configs.append(("dpmpp-2m, DDIM's nodes", "dpmpp-2m", {},
                            lambda k: {"timesteps": schedule.timesteps(k, "linspace")}))
        if grid == "linear" and "flow-dpmpp-2m" in names:
            configs.append(("flow-dpmpp-2m, diffusers' flow sigmas", "flow-dpmpp-2m", {},
                            lambda k: {"sigmas": list(np.linspace(FLOW_SIGMA_MAX, 0.0, k + 1)[:-1])}))
        results, notes, deterministic = {}, {}, {}
        for label, name, kw, own_grid in configs:
            per_k = {}
            for k in STEPS:
                t0 = time.perf_counter()
                if own_grid is not None:
                    s, note = fastdiff.make_sampler(name, schedule, None, backend="torch", **own_grid(k), **kw), ""
                else:
                    s, note = build(name, schedule, k, grid, kw)
                if s is None:
                    notes[label] = note
                    log(f"  {grid}: {label} not run: {note}")
                    break
                if note:
                    notes[label] = note
                x = run(s)
                if k == STEPS[0]:  # deterministic: the same x_T with another seed gives the same x0
                    x_T = s.initial_noise((n, gm.dim), torch.tensor([0]))
                    deterministic[label] = torch.equal(run(s, 0, x_T), run(s, 1, x_T))
                ode = ode_errors(x) if deterministic[label] else (float("nan"),) * 3
                per_k[k] = ode + (frechet_distance(ref_x0, x), sliced_wasserstein(ref_x0, x, n_projections=128))
                log(f"  {grid:8s} {label:38s} K={k:3d}  " + "  ".join(
                    f"{m} {fmt(v, m)}" for m, v in zip(METRICS, per_k[k])) + f"  ({time.perf_counter() - t0:.1f} s)")
            if per_k:
                results[label] = per_k
        tables[grid] = {"results": results, "notes": notes, "deterministic": deterministic}
    if not flow and "euler" in names:
        k = STEPS[-1]
        s, _ = build("euler", schedule, k, "linspace", {})
        x_T = s.initial_noise((n, gm.dim), torch.tensor([0]))
        matched = run(s, x=x_T / s.init_noise_sigma * float(np.sqrt(s.sigmas[0] ** 2 + 1.0)))
        extras["euler_start"] = (k, rms(run(s), matched))
        log(f"  euler K={k}: x_T = sigma_max z vs sqrt(sigma_max^2 + 1) z moves x0 by RMS {extras['euler_start'][1]:.3g}")
    return {"tables": tables, "floor": floor, "extras": extras, "n": n, "skipped": skipped}


def fmt(v, metric):
    if v != v:
        return "—"
    return f"{v:.1%}" if metric == "mode switch" else f"{v:.3g}"


def table_md(title, res):
    ex = res["extras"]
    chk = ex["ref_check"]
    head = (f"{res['n']} samples per entry. ODE reference: {ex['ref']}; {ex['check']} from the same noise differs "
            f"from it by RMS {chk[0]:.3g}, {chk[1]:.3g} over the samples in the same mode, {chk[2]:.2%} of samples in "
            f"another mode (the reference's resolution). Exact vs exact: FD {res['floor'][0]:.3g}, "
            f"SW2 {res['floor'][1]:.3g}.")
    if "euler_start" in ex:
        k, d = ex["euler_start"]
        head += (f" Euler's sigma-space start x_T = sigma_max z instead of sqrt(sigma_max^2 + 1) z moves its "
                 f"K = {k} x0 by RMS {d:.3g}.")
    if res["skipped"]:
        head += f" Not registered, skipped: {', '.join(res['skipped'])}."
    lines = [f"### {title}", "", head, ""]
    for grid, tab in res["tables"].items():
        lines += [f"Grid: {grid}", ""]
        for shown in TABLES:
            lines += ["| solver | " + " | ".join(f"{m} K={k}" for m in shown for k in STEPS) + " |",
                      "|---|" + "---:|" * (len(shown) * len(STEPS))]
            for label, per_k in tab["results"].items():
                if shown is TABLES[0] and not tab["deterministic"][label]:
                    continue
                cells = [fmt(per_k[k][METRICS.index(m)], m) for m in shown for k in STEPS]
                lines.append(f"| {label}{'' if tab['deterministic'][label] else ' (stochastic)'} | "
                             + " | ".join(cells) + " |")
            lines.append("")
        for label, note in tab["notes"].items():
            lines += [f"{label}: {note}.", ""]
    return "\n".join(lines)


def plot(all_res, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(name, grid, tab, res) for name, res in all_res for grid, tab in res["tables"].items()]
    shown = ("ODE err", "FD")
    fig, axes = plt.subplots(len(panels) // 2, 2 * len(shown), figsize=(20, 3.6 * len(panels) // 2), squeeze=False)
    for pi, (name, grid, tab, res) in enumerate(panels):
        for si, metric in enumerate(shown):
            ax = axes[pi // 2][(pi % 2) * len(shown) + si]
            mi = METRICS.index(metric)
            for li, (label, per_k) in enumerate(tab["results"].items()):
                vals = [per_k[k][mi] for k in STEPS]
                if all(v != v for v in vals):
                    continue
                ax.plot(STEPS, vals, "-" if tab["deterministic"][label] else "--", color=f"C{li % 10}", marker="o",
                        ms=3, label=label)
            ax.axhline(res["extras"]["ref_check"][0] if metric == "ODE err" else res["floor"][0], color="k", ls=":",
                       label="reference check" if metric == "ODE err" else "exact vs exact")
            steps_axes(ax, STEPS, f"{name}, {grid}: {metric}", 8)
            ax.legend(fontsize=5)
    save_figure(fig, title, path, 80)


def main(argv=None):
    args = parse_args(__doc__, "small sample sets, a smoke test", argv)
    require("benchmarks/quality_solvers.py", "matplotlib")
    start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    q = args.quick
    mixtures = [("2-d mixture, 4 modes", GaussianMixture.random(2, 4, seed=1), 1000 if q else 4000),
                ("64-d mixture, 8 modes", GaussianMixture.random(64, 8, seed=2), 500 if q else 2000)]
    env = environment(args, "backend torch, sampler seed 0")
    lines = [SECTION, "", env, "",
             "Mixtures: `GaussianMixture.random(dim, modes, std_range=(0.005, 0.3))` (2-d seed 1 as in "
             "benchmarks/quality.py, 64-d seed 2), exact networks at each step's own noise level; VP: linear "
             "schedule over 1000 steps, flow: FlowSchedule() (shift 1). ODE err = RMS per coordinate of x0 minus "
             "the 1000-step solution from the same noise, same-mode err = the same over the samples that end in the "
             "solution's mode, mode switch = the samples that do not (the first table of each grid: deterministic "
             "solvers only); FD = Frechet distance of fitted Gaussians, SW2 = sliced Wasserstein-2 (128 directions) "
             "against exact samples (the second table: every solver). Grids (see the script's "
             "docstring): VP linspace = each solver's own timestep_spacing='linspace' (DDIM / DDPM / Euler end at "
             "t = 0, DPM-Solver++ at t = 999/K); log-SNR = nodes uniform in lambda from t = 999 to 0; flow linear = "
             "sigmas linspace(0.999, 0.001, K); flow log-SNR = uniform in lambda between the same ends. One seed.",
             ""]
    all_res = []
    for mname, gm, n in mixtures:
        for path in ("vp", "flow"):
            title = f"{mname}, {'VP (linear schedule)' if path == 'vp' else 'flow (rectified flow)'}"
            log(f"\n== {title}: {n} samples")
            res = run_path(gm, path, n, log)
            md = table_md(title, res)
            print("\n" + md)
            lines += [md, ""]
            all_res.append((title, res))
    png = os.path.join(HERE, "quality_solvers.png")
    plot(all_res, png, f"solver error vs steps on the analytic test bed ({env.split(',')[0]}, "
                       f"{env.split(',')[1].strip()})")
    finish(args, SECTION, lines, png, " (ODE err and FD)", start)

if __name__ == "__main__":
    sys.exit(main())

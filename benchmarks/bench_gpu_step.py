"""One sampler step of every update family, five ways, against a device-to-device copy:

* ``copy``: ``dst.copy_(src)``, the bandwidth a step is held against;
* ``fastdiff fused``: the family's fused kernel (one launch, fp32 arithmetic, one pass over memory);
* ``eager torch ops``: the same update written as plain torch ops, as a user would;
* ``diffusers``: the matching diffusers scheduler's ``step`` (where diffusers has one);
* ``torch.compile``: the eager function compiled (dynamic=False, one graph per size and dtype;
  the first call's time, autotuning included, in its own column).

    python benchmarks/bench_gpu_step.py                         # every family, size and dtype (GPU)
    python benchmarks/bench_gpu_step.py --dry                   # tiny sizes: checks the script on a CPU
    python benchmarks/bench_gpu_step.py --families ocm --sizes 16M --dtypes bf16   # rerun a subset

A family is one entry of FAMILIES (the sampler whose coefficient table the step reads, the extra
tensors it reads, the fused call, the eager update, the diffusers step): adding one (flow Euler,
a multistep solver with history) adds its rows everywhere. GB/s counts the bytes a step must move
(every tensor it reads once, its output written once); "% copy" divides by the bandwidth of
``copy_`` (2 n bytes-per-element) measured in the same run at the same size and dtype. Inputs
rotate over several buffer sets so that a working set above the L2 size is read from memory.

Order, most wanted first (the phase may be cut short): the large sizes (16M, 64M: the bandwidth
target is about them) without torch.compile, then torch.compile at the large sizes, then the small
sizes, then their compiles. A compile that would pass the deadline (estimated by
bench_gpu_common.compile_estimate) is a "skipped" row.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fastdiff
from bench_gpu_common import (DTYPES, Deadline, Table, add_suite_args, attempt, compile_estimate, fmt_time,
                              import_diffusers, pick_device, provenance, sync, time_call)

LARGE = [("16M", (64, 4, 256, 256)), ("64M", (256, 4, 256, 256))]
SMALL = [("1M", (16, 4, 128, 128)), ("16K", (1, 4, 64, 64))]
# The dry run: one even and one odd shape, enough to run every code path on a CPU in seconds.
DRY_LARGE = [("dry 2x4x16x16", (2, 4, 16, 16))]
DRY_SMALL = [("dry 1x3x5x7", (1, 3, 5, 7))]
ROTATE_BYTES = 256 * 2**20  # rotate inputs over at least this much memory (H200 L2: 60 MB)
STEPS, STEP_INDEX = 50, 10  # the table row a step reads: step 10 of 50 (t = 780 with leading spacing)
# No compile has been timed on the GPU machine yet: this guess stands until the first compile of
# the run replaces it with a measured figure (the largest seen so far).
COMPILE_GUESS_S = 30.0


@dataclass
class StepContext:
    """What every variant of one family at one size needs, built once."""
    device: torch.device
    backend: str
    table: torch.Tensor  # the sampler's device table [K, NCOL] fp32
    step: torch.Tensor  # the device step index (int32, one element)
    seed: torch.Tensor  # the device seed (int64, one element)
    coef: Dict[str, float]  # the host row STEP_INDEX by column name (float64 -> Python floats)
    timestep: int  # the model timestep of that row
    diffusers: object = None  # the diffusers module, or None
    guidance_scale: Optional[torch.Tensor] = None  # w of the guided families (float32, one element)


@dataclass(frozen=True)
class Family:
    """One update family of the step benchmark.

    ``inputs``: the tensors the step reads besides x_t and the model output, name -> "x" (x's
    dtype) or a torch dtype name ("float32": OCM's h stays fp32 whatever x's dtype).
    ``fused(ctx, bufs)`` writes ``bufs["out"]``; ``eager(coef, x, model_output, *inputs)`` is the
    plain-torch update (timed eagerly and under torch.compile); ``diffusers(ctx)`` returns a
    callable of ``bufs`` doing diffusers' step, or None, with ``no_diffusers`` saying why."""
    name: str
    sampler: Callable[[], object]
    fused: Callable[[StepContext, Dict[str, torch.Tensor]], object]
    eager: Callable[..., torch.Tensor]
    inputs: Dict[str, str] = field(default_factory=dict)
    diffusers: Optional[Callable[[StepContext], Callable[[Dict[str, torch.Tensor]], object]]] = None
    no_diffusers: str = ""


def _x0_eps(c, x, eps):
    return (x - c["b_t"] * eps) / c["a_t"], eps


def eager_ddim(c, x, eps):
    """DDIM (eta = 0): x_s = c_x0 x0_hat + c_eps eps_hat, x0_hat = (x_t - sigma_t eps)/sqrt(ab_t)."""
    x0, eps = _x0_eps(c, x, eps)
    return c["c_x0"] * x0 + c["c_eps"] * eps


def eager_ddpm(c, x, eps):
    """DDPM ancestral: x_s = c_x0 x0_hat + c_xt x_t + std z, z from torch's generator."""
    x0, _ = _x0_eps(c, x, eps)
    return c["c_x0"] * x0 + c["c_xt"] * x + c["std"] * torch.randn_like(x)


def eager_ocm(c, x, eps, h):
    """OCM: the base mean, noise widened per element by Sigma0 = clamp(cov_scale (1 + h), 0, 1)."""
    x0, eps = _x0_eps(c, x, eps)
    mean = c["c_x0"] * x0 + c["c_eps"] * eps + c["c_xt"] * x
    sigma0 = (c["cov_scale"] * (1.0 + h)).clamp(0.0, 1.0)
    var = (c["std"] ** 2 + c["c_cov"] ** 2 * sigma0).clamp(max=c["var_max"])
    return (mean + var.sqrt() * torch.randn_like(h)).to(x.dtype)


def eager_flow_euler(c, x, u):
    """Flow-matching Euler: x_s = x_t + (sigma_s - sigma_t) u."""
    return x + c["c_m"] * u


GUIDANCE_SCALE, GUIDANCE_RESCALE = 7.5, 0.7


def cfg(u, cond, rescale=0.0):
    """A pipeline's classifier-free guidance: m = u + w (c - u), then diffusers' rescale_noise_cfg."""
    m = u + GUIDANCE_SCALE * (cond - u)
    if rescale:
        dims = list(range(1, m.dim()))
        m = rescale * (m * (cond.std(dim=dims, keepdim=True) / m.std(dim=dims, keepdim=True))) + (1 - rescale) * m
    return m


def eager_ddim_cfg(c, x, u, cond):
    """DDIM (eta = 0) on the guided output: the combination as torch ops, then the update."""
    return eager_ddim(c, x, cfg(u, cond))


def eager_ddim_cfg_rescale(c, x, u, cond):
    """The same with guidance rescale (two per-sample stds before the update)."""
    return eager_ddim(c, x, cfg(u, cond, GUIDANCE_RESCALE))


def eager_unipc(c, x, u, h0, h1, x0_out):
    """UniPC (order 2, corrector in): x_s = c_xt x_t + c_x0 x0_hat + c_h0 H0 + c_h1 H1 with
    x0_hat = x_t - sigma u (flow), x0_hat kept for the next step."""
    x0 = x - c["b_t"] * u
    x0_out.copy_(x0)
    return c["c_xt"] * x + c["c_x0"] * x0 + c["c_h0"] * h0 + c["c_h1"] * h1


def _check_timestep(sched, ctx: StepContext) -> int:
    t = int(sched.timesteps[STEP_INDEX])
    if t != ctx.timestep:
        raise ValueError(f"diffusers' timestep {STEP_INDEX} is {t} but fastdiff's table row is for {ctx.timestep}: "
                         "the two schedules disagree, so the rows would not compare the same step")
    return t


def diffusers_ddim(ctx: StepContext):
    sched = ctx.diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    sched.set_timesteps(STEPS)
    t = _check_timestep(sched, ctx)
    return lambda b: sched.step(b["eps"], t, b["x"], eta=0.0)


def diffusers_ddpm(ctx: StepContext):
    sched = ctx.diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    sched.set_timesteps(STEPS)
    t = _check_timestep(sched, ctx)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    return lambda b: sched.step(b["eps"], t, b["x"], generator=gen)


def diffusers_ddim_cfg(ctx: StepContext, rescale=0.0):
    step_fn = diffusers_ddim(ctx)
    return lambda b: step_fn({"eps": cfg(b["eps"], b["cond"], rescale), "x": b["x"]})


def diffusers_flow(ctx: StepContext):
    sched = ctx.diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[STEP_INDEX]

    def run(b):
        sched._step_index = STEP_INDEX  # the same row on every call
        return sched.step(b["eps"], t, b["x"])

    return run


def diffusers_unipc(ctx: StepContext):
    sched = ctx.diffusers.UniPCMultistepScheduler(**WAN_UNIPC)
    sched.set_timesteps(STEPS)
    t = sched.timesteps[STEP_INDEX]
    x = torch.randn(4, 8, device=ctx.device)
    for s in sched.timesteps[:STEP_INDEX]:  # the history a step at STEP_INDEX has
        x = sched.step(torch.randn_like(x), s, x).prev_sample

    def run(b):
        sched._step_index = STEP_INDEX  # the same row on every call
        sched.last_sample = b["x"]
        sched.model_outputs = [b["h1"], b["h0"]]
        return sched.step(b["eps"], t, b["x"])

    return run


def _vp(ctx, b, **kw):
    return fastdiff.step(b["x"], b["eps"], ctx.table, ctx.step, out=b["out"], backend=ctx.backend, **kw)


def _cfg_fused(ctx, b, rescale=0.0):
    return _vp(ctx, b, guidance=True, guidance_rescale=rescale, guidance_cond=b["cond"],
               guidance_scale=ctx.guidance_scale)


def _ddim_sampler():
    return fastdiff.DDIMSampler(steps=STEPS, eta=0.0, timestep_spacing="leading", prev_timestep_rule="ratio")


# Clipping and dynamic thresholding are off in every row: thresholding adds a per-sample quantile
# (torch's, before the fused step), which is not what this table measures. The guided families
# read u (the "eps" buffer) and c ("cond"), two tensors of x's shape, as the halves of a model's
# doubled output would be; with rescale the fused step adds its per-sample std pass (GB/s still
# counts only the floor: x, u and c read once, x_s written once).
FAMILIES: List[Family] = [
    Family("ddim eta=0",
           lambda: fastdiff.DDIMSampler(steps=STEPS, eta=0.0, timestep_spacing="leading", prev_timestep_rule="ratio"),
           fused=lambda ctx, b: _vp(ctx, b), eager=eager_ddim, diffusers=diffusers_ddim),
    Family("ddpm, noise in-kernel",
           lambda: fastdiff.DDPMSampler(steps=STEPS, timestep_spacing="leading"),
           fused=lambda ctx, b: _vp(ctx, b, seed=ctx.seed), eager=eager_ddpm, diffusers=diffusers_ddpm),
    Family("ocm-ddim eta=0, noise in-kernel",
           lambda: fastdiff.OCMDDIMSampler(steps=STEPS, eta=0.0, timestep_spacing="leading",
                                           prev_timestep_rule="ratio"),
           fused=lambda ctx, b: _vp(ctx, b, seed=ctx.seed, var_mode="ocm", aux=b["h"], cov_max=1.0),
           eager=eager_ocm, inputs={"h": "float32"}, no_diffusers="diffusers has no OCM step"),
    Family("flow euler",
           lambda: fastdiff.FlowEulerSampler(dict(shift=3.0), STEPS),
           fused=lambda ctx, b: _vp(ctx, b, prediction_type="flow_prediction"), eager=eager_flow_euler,
           diffusers=diffusers_flow),
    Family("ddim eta=0, cfg", _ddim_sampler, fused=_cfg_fused, eager=eager_ddim_cfg, inputs={"cond": "x"},
           diffusers=diffusers_ddim_cfg),
    Family("ddim eta=0, cfg + rescale", _ddim_sampler,
           fused=lambda ctx, b: _cfg_fused(ctx, b, GUIDANCE_RESCALE), eager=eager_ddim_cfg_rescale,
           inputs={"cond": "x"}, diffusers=lambda ctx: diffusers_ddim_cfg(ctx, GUIDANCE_RESCALE)),
    # Wan's scheduler: UniPC bh2 order 2 on flow sigmas (shift 5); the fused step reads x_t, u and
    # two previous x0_hat and writes x_s and this x0_hat (the drop-in also writes the corrected sample).
    Family("flow unipc (Wan), 2 history",
           lambda: fastdiff.samplers.FlowUniPCSampler(dict(shift=5.0), STEPS),
           fused=lambda ctx, b: _vp(ctx, b, prediction_type="flow_prediction", history=(b["h0"], b["h1"]),
                                    x0_out=b["x0o"]),
           eager=eager_unipc, inputs={"h0": "float32", "h1": "float32", "x0o": "float32"},
           diffusers=diffusers_unipc),
]
WAN_UNIPC = dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction")


def make_context(fam: Family, device, backend, diffusers) -> StepContext:
    sampler = fam.sampler()
    table, ts, ids = sampler.device_state(device)
    row = sampler.table.host[STEP_INDEX]
    coef = {name: float(row[i]) for i, name in enumerate(fastdiff.COLUMNS)}
    return StepContext(device=device, backend=backend, table=table, step=ids[STEP_INDEX],
                       seed=torch.tensor([1], dtype=torch.int64, device=device), coef=coef,
                       timestep=int(sampler.timesteps[STEP_INDEX]), diffusers=diffusers,
                       guidance_scale=torch.tensor([GUIDANCE_SCALE], dtype=torch.float32, device=device))


def make_buffers(fam: Family, shape, dtype, device, sets: int) -> List[Dict[str, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)
    bufs = []
    for _ in range(sets):
        b = {"x": torch.randn(shape, generator=gen, device=device, dtype=dtype),
             "eps": torch.randn(shape, generator=gen, device=device, dtype=dtype)}
        for name, kind in fam.inputs.items():
            dt = dtype if kind == "x" else getattr(torch, kind)
            # h ~ sigma_t^2 diag(Hessian of log p_t): about -1..0 for data in [-1, 1]
            b[name] = torch.randn(shape, generator=gen, device=device, dtype=dt).mul_(0.2).sub_(0.5)
        b["out"] = torch.empty_like(b["x"])
        bufs.append(b)
    return bufs


def bytes_moved(b: Dict[str, torch.Tensor]) -> int:
    """Every tensor read once and the output written once: the floor of what a step moves."""
    return sum(t.numel() * t.element_size() for t in b.values())


def tensors_of(fam: Family, b: Dict[str, torch.Tensor]) -> tuple:
    """The eager update's tensor arguments: x_t, the model output, then the family's inputs."""
    return (b["x"], b["eps"]) + tuple(b[k] for k in fam.inputs)


class Rotor:
    """Hands out the next buffer set on each call, so consecutive calls miss the L2."""

    def __init__(self, bufs):
        self.bufs, self.k = bufs, 0

    def __call__(self):
        self.k = (self.k + 1) % len(self.bufs)
        return self.bufs[self.k]


def rotation(device, n: int, bytes_per_element: int) -> int:
    """Buffer sets to rotate over: at least ROTATE_BYTES in all on a GPU, at most 32 sets."""
    if device.type != "cuda":
        return 1
    return max(1, min(32, math.ceil(ROTATE_BYTES / (n * bytes_per_element))))


class StepBench:
    """The variant loop. Every variant runs through ``attempt`` (a failure is an error row) after
    asking the deadline (what no longer fits is a skipped row), so the table always goes on."""

    def __init__(self, args, families: List[Family], device, tab: Table, deadline: Deadline, diffusers=None,
                 diffusers_missing: str = "diffusers not importable"):
        self.args, self.families, self.device, self.tab, self.deadline = args, families, device, tab, deadline
        self.diffusers, self.diffusers_missing = diffusers, diffusers_missing
        self.backend = "triton" if device.type == "cuda" else "torch"
        self.counts = {"ok": 0, "error": 0, "skipped": 0}
        self.copy_bw: Dict[Tuple[str, str], float] = {}
        self.fused_s: Dict[Tuple[str, str, str], float] = {}
        self.compile_seen: List[float] = []
        self.contexts: Dict[str, StepContext] = {}

    # -- rows ---------------------------------------------------------------------------------
    def row(self, key, op, sec=None, moved=None, vs=None, first=None, status=None):
        if status is not None:
            self.counts[status.split(":", 1)[0]] += 1
            self.tab.add_status(list(key) + [op], status, dict(size=key[0], dtype=key[1], family=key[2], op=op))
            return
        self.counts["ok"] += 1
        ref_bw = self.copy_bw.get(key[:2])
        bw = moved / sec
        self.tab.add(list(key) + [op, fmt_time(sec), f"{bw / 1e9:.0f}", f"{100 * bw / ref_bw:.0f}%" if ref_bw else "-",
                                  f"{sec / vs:.2f}x" if vs else "-", fmt_time(first) if first is not None else "-"],
                     dict(size=key[0], dtype=key[1], family=key[2], op=op, seconds=sec, bytes=moved, gbps=bw / 1e9,
                          pct_copy=100 * bw / ref_bw if ref_bw else None, first_call_seconds=first))

    def timed(self, label, fn, needs=1.0):
        """(seconds per call, None) or (None, the reason for a status row). ``needs``: 4 warm-up
        calls + min_time (0.1 s) of timed calls, and a Triton compile on a variant's first launch
        (about a second; a guess, not timed on the GPU machine)."""
        refused = self.deadline.refuses(needs)
        if refused:
            return None, refused
        return attempt(label, lambda: time_call(fn, self.device, min_time=self.args.min_time))

    # -- variants -----------------------------------------------------------------------------
    def copy_row(self, size_name, shape, dname):
        dt = DTYPES[dname]
        key = (size_name, dname, "-")
        refused = self.deadline.refuses(1.0)
        if refused:
            return self.row(key, "copy", status=refused)

        def setup():
            # sources rotate too: one 16M fp16 source (32 MB) would be read from the 60 MB L2
            n, esz = math.prod(shape), torch.empty((), dtype=dt).element_size()
            sets = rotation(self.device, n, 2 * esz)
            pairs = [(torch.randn(shape, device=self.device, dtype=dt),
                      torch.empty(shape, device=self.device, dtype=dt)) for _ in range(sets)]
            return Rotor(pairs), 2 * n * esz

        got, err = attempt(f"step/{size_name}/{dname}/-/copy setup", setup)
        if err:
            return self.row(key, "copy", status=err)
        rot, moved = got

        def copy():
            src, dst = rot()
            dst.copy_(src)

        sec, err = self.timed(f"step/{size_name}/{dname}/-/copy", copy)
        if sec is not None:
            self.copy_bw[key[:2]] = moved / sec
        self.row(key, "copy", sec, moved, status=err)

    def buffers(self, fam: Family, size_name, shape, dname):
        """(context, rotor over buffer sets, bytes a step moves), or raises."""
        if fam.name not in self.contexts:
            self.contexts[fam.name] = make_context(fam, self.device, self.backend, self.diffusers)
        dt = DTYPES[dname]
        esz = torch.empty((), dtype=dt).element_size()
        per_element = 3 * esz + sum(esz if k == "x" else torch.empty((), dtype=getattr(torch, k)).element_size()
                                    for k in fam.inputs.values())
        bufs = make_buffers(fam, shape, dt, self.device, rotation(self.device, math.prod(shape), per_element))
        return self.contexts[fam.name], Rotor(bufs), bytes_moved(bufs[0])

    def plain_rows(self, fam: Family, size_name, shape, dname):
        key, label = (size_name, dname, fam.name), f"step/{size_name}/{dname}/{fam.name}"
        got, err = attempt(label + "/setup", lambda: self.buffers(fam, size_name, shape, dname))
        if err:
            return self.row(key, "setup", status=err)
        ctx, rot, moved = got
        sec, err = self.timed(label + "/fastdiff fused", lambda: fam.fused(ctx, rot()))
        if sec is not None:
            self.fused_s[key] = sec
        self.row(key, "fastdiff fused", sec, moved, status=err)
        sec, err = self.timed(label + "/eager torch ops", lambda: fam.eager(ctx.coef, *tensors_of(fam, rot())))
        self.row(key, "eager torch ops", sec, moved, self.fused_s.get(key), status=err)
        if fam.diffusers is None or self.diffusers is None:
            return self.row(key, "diffusers", status="skipped: " + (fam.no_diffusers or self.diffusers_missing))
        step_fn, err = attempt(label + "/diffusers setup", lambda: fam.diffusers(ctx))
        if err:
            return self.row(key, "diffusers", status=err)
        sec, err = self.timed(label + "/diffusers", lambda: step_fn(rot()))
        self.row(key, "diffusers", sec, moved, self.fused_s.get(key), status=err)

    def compile_row(self, fam: Family, size_name, shape, dname):
        mode = self.args.compile_mode
        key, op = (size_name, dname, fam.name), "torch.compile" + ("" if mode == "none" else f" ({mode})")
        label = f"step/{size_name}/{dname}/{fam.name}/{op}"
        if self.args.compile_mode == "none":
            return self.row(key, op, status="skipped: " + self.args.no_compile_reason)
        est = compile_estimate(self.compile_seen, self.args.compile_guess)
        refused = self.deadline.refuses(est + 2.0)  # + the timing itself
        if refused:
            why = (f"estimated from the last compile, {self.compile_seen[-1]:.1f} s" if self.compile_seen
                   else f"a compile is guessed at {est:.0f} s, none timed yet")
            return self.row(key, op, status=f"{refused}; {why}")
        got, err = attempt(label + " setup", lambda: self.buffers(fam, size_name, shape, dname))
        if err:
            return self.row(key, op, status=err)
        ctx, rot, moved = got
        coef = ctx.coef

        def update(*tensors):
            return fam.eager(coef, *tensors)

        def first_call():
            torch._dynamo.reset()  # one graph per row: dynamo falls back to eager after 8 recompiles
            compiled = torch.compile(update, mode=self.args.compile_mode, dynamic=False)
            tensors = tensors_of(fam, rot())
            sync(self.device)
            t0 = time.perf_counter()
            compiled(*tensors)
            sync(self.device)
            return compiled, time.perf_counter() - t0

        got, err = attempt(label, first_call)
        if err:
            return self.row(key, op, status=err)
        compiled, first = got
        self.compile_seen.append(first)
        sec, err = attempt(label + " timing", lambda: time_call(lambda: compiled(*tensors_of(fam, rot())), self.device,
                                                                min_time=self.args.min_time))
        self.row(key, op, sec, moved, self.fused_s.get(key), first=first, status=err)

    def run(self, plan) -> Dict[str, int]:
        """``plan``: (sizes, with_compile) passes in order. Returns the rows by status."""
        for sizes, with_compile in plan:
            for size_name, shape in sizes:
                for dname in self.args.dtypes:
                    if not with_compile:
                        self.copy_row(size_name, shape, dname)
                    for fam in self.families:
                        (self.compile_row if with_compile else self.plain_rows)(fam, size_name, shape, dname)
                        if self.device.type == "cuda":
                            torch.cuda.empty_cache()  # 64M fp32 sets are 1 GB: free before the next
        return self.counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_suite_args(p, "step")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--families", default=None, help="comma-separated beginnings of family names (default: "
                                                     "all): " + ", ".join(f.name for f in FAMILIES))
    p.add_argument("--sizes", default=None, help="comma-separated size labels (default: all): 16M,64M,1M,16K")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode; 'none' skips it. Default max-autotune-no-cudagraphs: max-autotune's "
                        "kernel tuning (max_autotune, coordinate_descent_tuning) without its CUDA graph, whose replay "
                        "copies every input tensor into the graph's own buffer (torch/_inductor/cudagraph_trees.py, "
                        "_copy_inputs_and_remove_from_src): for DDIM 4 more passes over memory than the update's 3")
    p.add_argument("--compile-guess", type=float, default=None,
                   help=f"seconds a compile is assumed to take until one is timed (default {COMPILE_GUESS_S:.0f})")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds of timed calls per variant")
    args = p.parse_args(argv)
    device = pick_device(args.device, args.dry)
    args.no_compile_reason = "--compile-mode none"
    if args.compile_mode is None:
        if args.dry and device.type != "cuda":
            args.compile_mode = "none"
            args.no_compile_reason = "dry run on a CPU (inductor takes minutes on a few cores; pass --compile-mode)"
        else:
            args.compile_mode = "max-autotune-no-cudagraphs"
    args.compile_guess = COMPILE_GUESS_S if args.compile_guess is None else args.compile_guess
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in DTYPES for d in args.dtypes):
        p.error(f"--dtypes must be chosen from {sorted(DTYPES)}, got {args.dtypes}")
    families = FAMILIES
    if args.families:
        want = [w.strip() for w in args.families.split(",") if w.strip()]
        families = [f for f in FAMILIES if any(f.name.startswith(w) for w in want)]
        if not families:
            p.error(f"--families {args.families!r} matches none of {[f.name for f in FAMILIES]}")
    large, small = (DRY_LARGE, DRY_SMALL) if args.dry else (LARGE, SMALL)
    if args.dry:
        args.min_time = min(args.min_time, 0.01)
    if args.sizes:
        keep = {s.strip() for s in args.sizes.split(",")}
        known = {s for s, _ in large + small}
        if not keep <= known:
            p.error(f"--sizes must be chosen from {sorted(known)}, got {sorted(keep)}")
        large, small = [s for s in large if s[0] in keep], [s for s in small if s[0] in keep]
    plan = [(large, False), (large, True), (small, False), (small, True)]
    diffusers, diffusers_missing = import_diffusers()
    deadline = Deadline.from_args(args)
    backend = "triton" if device.type == "cuda" else "torch"
    tab = Table("Step kernel: fused vs eager torch vs diffusers vs torch.compile",
                ["size", "dtype", "family", "op", "time", "GB/s", "% copy", "time / fused", "first call"],
                provenance(device, args.dry),
                notes=[f"Step {STEP_INDEX}/{STEPS} of each family's table, clip and thresholding off; fastdiff path: "
                       f"{backend}" + ("" if backend == "triton" else " (the plain-torch reference, not the kernel)")
                       + f"; torch.compile mode {args.compile_mode}, dynamic=False (first call = compile + "
                       "autotune). GB/s: bytes the step must move (each input read once, the output written once) "
                       "/ time; % copy: against copy_ at the same size and dtype; noise in eager and compiled "
                       "rows is torch's randn, in fused rows fastdiff's in-kernel Philox."])
    tab.autosave(args.out, "step")
    counts = StepBench(args, families, device, tab, deadline, diffusers, diffusers_missing).run(plan)
    print(f"\nstep: {counts['ok']} rows measured, {counts['error']} errors, {counts['skipped']} skipped", flush=True)
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())

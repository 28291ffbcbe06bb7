"""The one step: every sampler, the graph runner and the diffusers drop-ins call ``step``.

``StepOptions`` (frozen, validated once, hashable: graph caches key on it) says how a model
output is read and how the noise is widened; a ``Table`` holds the per-step coefficients;
``step`` validates the tensors of one call and dispatches to the fused Triton kernel or its
plain-torch reference (fastdiff/engine/kernels/fused_step.py). Nothing else builds a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .kernels import cpu_step as _cpu
from .kernels import fused_step as _fused
from .kernels import philox as _philox
from .backend import resolve
from .checks import check_int, check_real
from .predictions import check_prediction
from .tables import FLOAT32_DIVISOR_MIN, NCOL, Table

VAR_MODES = tuple(_fused.VAR_MODES)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The global element index keys the noise (invariant 3); the kernel keeps it below 2**62.
MAX_INDEX = 2**62


@dataclass(frozen=True)
class StepOptions:
    """How one step reads the model and shapes its noise (everything but the per-step rows).

    * ``prediction_type``: "epsilon", "v_prediction", "sample" or "flow_prediction".
    * ``clip_range``: clamp x0_hat to [-r, r] (None: no clamp).
    * ``thresholding``: dynamic thresholding (Saharia et al., 2022): x0_hat -> clamp(x0_hat, -s, s)/s
      with s the ``dynamic_thresholding_ratio`` quantile of |x0_hat| per sample, clamped to
      [1, ``sample_max_value``]; one extra pass (the quantile needs all of x0_hat). Wins over clip.
    * ``recompute_eps``: eps_hat from the clipped x0_hat (diffusers' use_clipped_model_output).
    * ``var_mode``: "table" (the std column), "ocm" (aux = h, the covariance head),
      "learned_range" / "learned" (aux = the model's variance output).
    * ``cov_max``: upper clamp of OCM's Sigma0 (inf: none).
    * ``guidance``: classifier-free guidance. ``step`` then reads the unconditional output
      (``model_output``) and the conditional one (``guidance_cond``) and uses
      m = u + w (c - u), w the device tensor ``guidance_scale``, in place of the model output.
    * ``guidance_rescale``: phi in [0, 1] (Lin et al., 2023, "Common Diffusion Noise Schedules and
      Sample Steps are Flawed"; diffusers' rescale_noise_cfg): m -> (phi std(c_b)/std(m_b) + 1 - phi) m
      per sample b (std over the non-batch dims, Bessel-corrected); 0: off. Needs ``guidance``;
      one extra pass (the stds need all of c and m).
    """

    prediction_type: str = "epsilon"
    clip_range: Optional[float] = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    recompute_eps: bool = False
    var_mode: str = "table"
    cov_max: float = 1.0
    guidance: bool = False
    guidance_rescale: float = 0.0

    def __post_init__(self):
        check_prediction(self.prediction_type)
        if self.clip_range is not None:
            object.__setattr__(self, "clip_range", check_real("clip_range (None for no clamp)", self.clip_range, 0,
                                                              lo_open=True))
        if self.thresholding:
            object.__setattr__(self, "dynamic_thresholding_ratio", check_real(
                "dynamic_thresholding_ratio", self.dynamic_thresholding_ratio, 0, 1, lo_open=True))
            object.__setattr__(self, "sample_max_value", check_real("sample_max_value", self.sample_max_value, 1))
        if self.var_mode not in VAR_MODES:
            raise ValueError(f"var_mode must be one of {VAR_MODES}, got {self.var_mode!r}")
        object.__setattr__(self, "cov_max", check_real("cov_max (inf for no cap)", self.cov_max, 0, lo_open=True,
                                                       allow_inf=True))
        for name in ("thresholding", "recompute_eps", "guidance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "guidance_rescale", check_real("guidance_rescale", self.guidance_rescale, 0, 1))
        if self.guidance_rescale and not self.guidance:
            raise ValueError(f"guidance_rescale={self.guidance_rescale:g} rescales a guided model output: it "
                             "needs guidance=True (or guidance_rescale=0)")


DEFAULT_OPTIONS = StepOptions()


# -- validation helpers ------------------------------------------------------------------------

def _check_tensor(name, t, shape, device, wide):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"x and {name} must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"x and {name} must be on the same device, got {device} and {t.device}")
    if wide:
        if t.dtype != torch.float64:
            raise ValueError(f"with float64 x every tensor must be float64 (computed in float64), "
                             f"got {name} of {t.dtype}")
    elif t.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16 (or float64 throughout), got {t.dtype}")


def _check_output(name, t, shape, device, wide):
    _check_tensor(name, t, shape, device, wide)
    if not t.is_contiguous() and _overlaps(t):
        raise ValueError(f"{name} must not have overlapping memory (e.g. an expanded tensor): two elements "
                         f"would be written to one address; got strides {t.stride()} for shape {tuple(shape)}")


def _span(t: torch.Tensor) -> tuple:
    """The [first, last + 1) byte addresses of ``t``'s elements (every element lies inside)."""
    base = t.data_ptr()
    if t.is_contiguous():
        return base, base + t.nbytes
    es = t.element_size()
    lo = hi = 0
    for st, sz in zip(t.stride(), t.shape):
        if st > 0:
            hi += st * (sz - 1)
        else:
            lo += st * (sz - 1)
    return base + lo * es, base + (hi + 1) * es


def _check_aliasing(outputs, inputs) -> None:
    """An output may be an input exactly (same data pointer, strides and dtype: element i is read
    and written by the same program, so in place is safe on every backend) but must not otherwise
    share memory with an input or with another output: the kernel would read elements another
    program already wrote, or write one address twice, and the result would depend on the
    backend and the launch order. Checked by byte span (about 2 us a step), so two interleaved
    views of one buffer (x[..., ::2] and x[..., 1::2]) are refused too: give separate tensors."""
    if outputs[0][1].numel() == 0:  # every output has x's shape: nothing is written
        return
    spans = [(iname, t) + _span(t) for iname, t in inputs if t.numel()]  # each tensor's bytes, once
    written = []
    for oname, o in outputs:
        a0, a1 = _span(o)
        for iname, t, b0, b1 in spans:
            if t is o:
                continue
            if a0 < b1 and b0 < a1 and not (a0 == b0 and o.dtype == t.dtype and o.stride() == t.stride()):
                raise ValueError(f"{oname} shares memory with {iname} without being it (same data pointer, strides "
                                 f"and dtype): the step would read elements it has already overwritten; give "
                                 f"{oname}={iname} for in place, or a separate tensor")
        for pname, b0, b1 in written:
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{pname} and {oname} must be different tensors that do not share memory: both "
                                 "are written by the step")
        written.append((oname, a0, a1))


def _check_precision(table_obj: Table, options: "StepOptions") -> None:
    """A float32 step divides by a_t (epsilon) or b_t (sample, recompute_eps): a coefficient that is
    positive in the float64 table but below ``FLOAT32_DIVISOR_MIN`` there would make x0_hat
    overflow or 0/0 in float32 and the samples NaN. The table finds its tiny divisors once, from
    its host copy; per step this is a dict lookup (no sync)."""
    tiny = table_obj.tiny_divisors
    if not tiny:
        return
    needs = []
    if options.prediction_type == "epsilon":
        needs.append(("a_t", "an epsilon prediction gives x0_hat = (x_t - b_t eps) / a_t"))
    if options.prediction_type == "sample" or options.recompute_eps:
        needs.append(("b_t", "eps_hat = (x_t - a_t x0_hat) / b_t"))
    for col, why in needs:
        if col in tiny:
            row, value = tiny[col]
            raise ValueError(
                f"the table's {col} at row {row} is {value:.3g}, below {FLOAT32_DIVISOR_MIN:g}, where float32 "
                f"arithmetic fails: {why}, which overflows to inf/NaN in float32. This happens with schedules "
                f"whose alpha_bar underflows (e.g. a linear schedule over tens of thousands of training "
                f"timesteps). Use fewer training timesteps or prediction_type='v_prediction' (no division); "
                f"fastdiff.step on float64 tensors computes in float64")


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share an address (strides sorted, each at least the extent
    of the faster dimensions: exact for the layouts slicing and permuting make)."""
    extent = 1
    for st, sz in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if st < extent:
            return True
        extent = st * sz
    return False


def _check_index(name, t, device):
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a one-element int32/int64 tensor on the device "
                         f"(it is read by the kernel, so a captured launch needs no host value)")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_guidance(options, model_output, cond, scale, device, wide) -> torch.Tensor:
    """Validate the guidance inputs of one step; returns the scale in the step's precision."""
    if not options.guidance:
        raise ValueError("guidance_cond / guidance_scale were given but options.guidance is False: pass "
                         "guidance=True (StepOptions(guidance=True, ...)) to guide, or neither tensor")
    if cond is None or scale is None:
        raise ValueError("guidance=True needs guidance_cond (the conditional model output; model_output is the "
                         "unconditional one) and guidance_scale (a one-element float32 tensor on x's device)")
    if isinstance(cond, torch.Tensor) and cond.shape != model_output.shape:
        raise ValueError(f"model_output (the unconditional output) and guidance_cond (the conditional one) must "
                         f"have the same shape, got {tuple(model_output.shape)} and {tuple(cond.shape)}")
    _check_tensor("guidance_cond", cond, model_output.shape, device, wide)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not scale.dtype.is_floating_point:
        got = (f"a tensor of shape {tuple(scale.shape)} and {scale.dtype}" if isinstance(scale, torch.Tensor)
               else type(scale).__name__)
        raise ValueError(f"guidance_scale must be a one-element floating-point tensor on x's device (the kernel "
                         f"reads it, so a new scale needs no CUDA-graph re-capture), got {got}")
    if scale.device != device:
        raise ValueError(f"guidance_scale must be on x's device {device}, got {scale.device}")
    if options.guidance_rescale and (model_output.dim() == 0 or math.prod(model_output.shape[1:]) < 2):
        raise ValueError(f"guidance_rescale needs a batch dimension and at least 2 elements per sample (a std "
                         f"with Bessel's correction), got shape {tuple(model_output.shape)}")
    want = torch.float64 if wide else torch.float32
    return scale if scale.dtype == want else scale.to(want)


def _as_device_table(table, device, wide) -> tuple:
    """(the table tensor the step reads, the Table or None)."""
    dtype = torch.float64 if wide else torch.float32
    if isinstance(table, Table):
        return table.on(device, dtype), table
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != NCOL or table.shape[0] < 1:
        raise ValueError(f"table must be a fastdiff Table or a [K, {NCOL}] tensor, got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    if not table.dtype.is_floating_point:
        raise ValueError(f"table must be a floating-point tensor (coefficients), got {table.dtype}")
    if table.device != device:
        raise ValueError(f"table must be on x's device {device}, got {table.device}")
    return table.to(dtype).contiguous(), None


def dynamic_thresholds(x, model_output, table: torch.Tensor, index, options: StepOptions, *,
                       guidance_cond=None, guidance_scale=None, guidance_factor=None) -> torch.Tensor:
    """Per-sample dynamic-thresholding values s_b: the ``dynamic_thresholding_ratio`` quantile of
    |x0_hat| over each sample, clamped to [1, sample_max_value]; [B], float32 (float64 for
    float64 samples). x0_hat is computed in the table's precision from upcast inputs, so half
    precision inputs do not move s by their rounding; with guidance, from the guided output."""
    wide = table.dtype == torch.float64 and x.dtype == torch.float64
    plain = StepOptions(prediction_type=options.prediction_type, guidance=guidance_cond is not None)
    xf = x if wide or x.dtype == torch.float32 else x.float()
    mf = model_output if wide or model_output.dtype == torch.float32 else model_output.float()
    # an index outside the table reads its nearest row, as the step itself does
    _, x0, _, _ = _fused.reference(xf, mf, table, index.clamp(0, table.shape[0] - 1), plain, guidance_cond=guidance_cond,
                                   guidance_scale=guidance_scale, guidance_factor=guidance_factor)
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = quantile_rows(flat, options.dynamic_thresholding_ratio)
    return s.clamp(min=1.0, max=options.sample_max_value)


def guidance_factors(model_output, guidance_cond, guidance_scale, rescale: float) -> torch.Tensor:
    """Per-sample guidance-rescale factors f_b = phi std(c_b) / std(m_b) + (1 - phi) with
    m = u + w (c - u) (``model_output`` u, ``guidance_cond`` c, ``guidance_scale`` w, ``rescale`` phi;
    std over each sample's elements with Bessel's correction, as diffusers' rescale_noise_cfg), so
    that f_b m is diffusers' phi m std(c)/std(m) + (1 - phi) m. [B], float32 (float64 when u is);
    computed on the device (no host sync) from upcast inputs.

    Each std is two passes, the row mean and then the norm of the deviations (Bessel's n - 1 being
    the same factor in both stds, it cancels in the ratio): torch.std's single-pass loop is ~20x
    slower on a CPU (1.35 ms against 60 us for one [16, 16384] float32 std, one thread)."""
    cdt = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    u = model_output.to(cdt).reshape(model_output.shape[0], -1)
    c = guidance_cond.to(cdt).reshape(u.shape)
    m = torch.lerp(u, c, guidance_scale.to(cdt).reshape(()))  # u + w (c - u), one pass
    std_m = torch.linalg.vector_norm(m.sub_(m.mean(dim=1, keepdim=True)), dim=1)
    std_c = torch.linalg.vector_norm(c - c.mean(dim=1, keepdim=True), dim=1)
    return std_c.div_(std_m).mul_(rescale).add_(1.0 - rescale)


# torch.quantile refuses rows longer than this ("quantile() input tensor is too large").
QUANTILE_MAX_ROW = 2**24


def quantile_rows(flat: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(flat, q, dim=1) (linear interpolation) for rows of any length, bit for bit:
    rows up to QUANTILE_MAX_ROW go to torch.quantile; longer ones (video latents) take the two
    order statistics around rank q (n - 1) with kthvalue and interpolate them as torch.quantile
    does (rank and weight in the tensor's dtype, torch.lerp). A row holding NaN gives NaN, as in
    torch.quantile; no host sync either way."""
    n = flat.shape[1]
    if n <= QUANTILE_MAX_ROW:
        return torch.quantile(flat, q, dim=1)
    np_dtype = np.float64 if flat.dtype == torch.float64 else np.float32
    rank = np_dtype(q) * np_dtype(n - 1)
    below, above = int(np.floor(rank)), int(np.ceil(rank))
    lo = flat.kthvalue(below + 1, dim=1).values
    hi = lo if above == below else flat.kthvalue(above + 1, dim=1).values
    out = torch.lerp(lo, hi, torch.full_like(lo, float(rank - np_dtype(below))))
    return torch.where(flat.isnan().any(dim=1), torch.full_like(out, math.nan), out)


# -- the step ----------------------------------------------------------------------------------

def step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: Union[Table, torch.Tensor],
    index: torch.Tensor,
    options: Optional[StepOptions] = None,
    *,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    sample_offset: int = 0,
    index_offset: Optional[int] = None,
    index_run: Optional[Tuple[int, int]] = None,
    aux: Optional[torch.Tensor] = None,
    history: Sequence[torch.Tensor] = (),
    thresholds: Optional[torch.Tensor] = None,
    guidance_cond: Optional[torch.Tensor] = None,
    guidance_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    x0_out: Optional[torch.Tensor] = None,
    eps_out: Optional[torch.Tensor] = None,
    xc_out: Optional[torch.Tensor] = None,
    model_in_out: Optional[torch.Tensor] = None,
    return_x0: bool = False,
    backend: Optional[str] = None,
    **option_kwargs,
):
    """One fused step x_t -> x_s (fastdiff/engine/kernels/fused_step.py has the update).

    Shapes: x, model_output, noise, aux, history tensors and every output: one shape S
    (dim 0 the batch); ``table``: a Table or a [K, NCOL] tensor on x's device; ``index``: a
    one-element int tensor on the device, the table row (a device value, so a captured loop
    needs no host value per step). An index outside [0, K) reads the nearest row, on every
    backend: it cannot be checked without a host sync, and it must never read past the table.

    * ``options``: a StepOptions, or its fields as keywords (``prediction_type="v_prediction"``).
    * Noise: ``noise`` (a tensor), ``seed`` (one-element int64 tensor: in-kernel Philox keyed by
      seed, global element index and row index), or neither. ``sample_offset``: the global index
      of x[0], so that a batch split across calls draws the noise of one call.
    * ``index_offset``, ``index_run``: x is a shard of a larger latent (fastdiff.engine.shard.Shard
      computes both): ``index_offset`` the global element index of x's first element (instead of
      ``sample_offset``), ``index_run=(length, stride)`` x's row-major elements in runs of
      ``length`` consecutive global indices, ``stride`` apart (a slice along one dimension).
    * ``aux``: the OCM head's h or the model's variance output (var_mode other than "table").
    * ``history``: up to four tensors H0..H3 added with the row's c_h0..c_h3 (multistep solvers).
    * ``thresholds``: explicit per-sample s_b [B]; computed when options.thresholding.
    * ``guidance_cond``, ``guidance_scale`` (with options.guidance): classifier-free guidance.
      ``model_output`` is the unconditional output u and ``guidance_cond`` the conditional c (the
      two halves of a model's doubled batch, ``out[:B]`` and ``out[B:]``: views, no copy);
      ``guidance_scale`` is w as a one-element float tensor on the device. The step reads u and c
      and uses m = u + w (c - u) (times the per-sample factor of options.guidance_rescale) for
      everything that reads the model output, c_m m included.
    * ``out`` may be ``x`` (in place); ``x0_out`` receives x0_hat, ``eps_out`` eps_hat,
      ``model_in_out`` c_in * x_s, ``xc_out`` the second combination of the same inputs
      x_c = xc_xt x_t + xc_x0 x0_hat + xc_eps eps_hat + sum_k xc_hk Hk (UniPC's corrected sample).
    * float32 / float16 / bfloat16 inputs (mixed allowed) compute in float32; float64 inputs
      (all of them) compute in float64 on every backend.

    Returns x_s (``out``), or (x_s, x0_hat) with ``return_x0``.
    """
    if options is None:
        options = StepOptions(**option_kwargs) if option_kwargs else DEFAULT_OPTIONS
    elif option_kwargs:
        raise TypeError(f"give options or option keywords, not both (got {sorted(option_kwargs)})")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    shape, device = x.shape, x.device
    wide = x.dtype == torch.float64
    _check_tensor("x", x, shape, device, wide)
    _check_tensor("model_output", model_output, shape, device, wide)
    tab, table_obj = _as_device_table(table, device, wide)
    _check_index("step index", index, device)
    if noise is not None:
        if seed is not None:
            raise ValueError("give either noise (a tensor) or seed (in-kernel noise), not both")
        _check_tensor("noise", noise, shape, device, wide)
    elif seed is not None:
        _check_index("seed", seed, device)
        if seed.dtype != torch.int64:
            seed = seed.to(torch.int64)
    if options.var_mode != "table":
        if aux is None:
            raise ValueError(f"var_mode={options.var_mode!r} needs aux (the "
                             f"{'covariance head' if options.var_mode == 'ocm' else 'variance'} output)")
        _check_tensor("aux", aux, shape, device, wide)
    if options.guidance or guidance_cond is not None or guidance_scale is not None:
        guidance_scale = _check_guidance(options, model_output, guidance_cond, guidance_scale, device, wide)
    if len(history) > _fused.MAX_HISTORY:
        raise ValueError(f"history holds at most {_fused.MAX_HISTORY} tensors (columns "
                         f"{', '.join(_fused.HISTORY_COLUMNS)}), got {len(history)}")
    for j, h in enumerate(history):
        _check_tensor(f"history[{j}]", h, shape, device, wide)
    if type(sample_offset) is not int or not 0 <= sample_offset < MAX_INDEX:
        sample_offset = check_int("sample_offset", sample_offset, 0, MAX_INDEX, hi_open=True)
    if thresholds is not None:
        if len(shape) == 0 or thresholds.shape != (shape[0],):
            raise ValueError(f"thresholds must have shape (batch,) = ({shape[0] if len(shape) else '?'},), "
                             f"got {tuple(thresholds.shape)}")
        if thresholds.device != device:
            raise ValueError(f"thresholds must be on {device}, got {thresholds.device}")
    outputs = [(name, t) for name, t in (("out", out), ("x0_out", x0_out), ("eps_out", eps_out), ("xc_out", xc_out),
                                         ("model_in_out", model_in_out)) if t is not None]
    for name, t in outputs:
        _check_output(name, t, shape, device, wide)
    if outputs:
        inputs = [("x", x), ("model_output", model_output)]
        inputs += [(name, t) for name, t in (("noise", noise), ("aux", aux), ("thresholds", thresholds),
                                             ("guidance_cond", guidance_cond)) if t is not None]
        inputs += [(f"history[{j}]", h) for j, h in enumerate(history)]
        _check_aliasing(outputs, inputs)
    if options.thresholding and len(shape) < 1:
        raise ValueError("thresholding needs a batch dimension")

    per_sample = math.prod(shape[1:]) if len(shape) > 1 else 1
    if index_offset is None:
        index_offset = sample_offset * per_sample
    elif sample_offset != 0 or isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"index_offset must be an int >= 0, given instead of sample_offset (not both), got "
                         f"index_offset={index_offset!r}, sample_offset={sample_offset}")
    n = x.numel()
    if index_run is not None:
        index_run = _philox.check_index_run(index_run, n)
    if (index_offset + n if index_run is None else _philox.index_end(index_offset, n, index_run)) > MAX_INDEX:
        raise ValueError(f"global element indices must stay below 2**62 (they key the noise): sample_offset * "
                         f"elements per sample + elements, got sample_offset={sample_offset} for {per_sample} "
                         f"elements per sample (index_offset {index_offset}, index_run {index_run})")
    if not wide and table_obj is not None:
        _check_precision(table_obj, options)
    guide = {}
    if options.guidance:
        factor = None
        if options.guidance_rescale:  # the per-sample stds first: one pass over u and c, no host sync
            factor = guidance_factors(model_output, guidance_cond, guidance_scale, options.guidance_rescale)
        guide = dict(guidance_cond=guidance_cond, guidance_scale=guidance_scale, guidance_factor=factor)
    if options.thresholding and thresholds is None:
        thresholds = dynamic_thresholds(x, model_output, tab, index, options, **guide)

    chosen = table_obj.backend(device, backend) if table_obj is not None else resolve(backend, device)
    used = table_obj.used if table_obj is not None else None
    if chosen == "cpp" and wide:
        chosen = "torch"  # float64 samples compute in float64: the reference
    if chosen == "cpp":
        if out is None:
            out = torch.empty_like(x)
        if return_x0 and x0_out is None:
            x0_out = torch.empty_like(x)
        _cpu.launch(x, model_output, tab, index, options, thresholds=thresholds,
                    noise=noise, seed=seed, index_offset=index_offset, index_run=index_run, aux=aux,
                    history=tuple(history), out=out, x0_out=x0_out, eps_out=eps_out, xc_out=xc_out,
                    model_in_out=model_in_out, **guide)
        return (out, x0_out) if return_x0 else out
    if wide or chosen == "torch":
        x_s, x0, model_in, extra = _fused.reference(
            x, model_output, tab, index.clamp(0, tab.shape[0] - 1), options, used=used, thresholds=thresholds,
            noise=noise, seed=seed, index_offset=index_offset, index_run=index_run, aux=aux, history=history,
            need_x0=return_x0 or x0_out is not None, need_eps=eps_out is not None, need_xc=xc_out is not None,
            need_model_in=model_in_out is not None, **guide)
        if out is not None:
            out.copy_(x_s)
            x_s = out
        if x0_out is not None:
            x0_out.copy_(x0)
            x0 = x0_out
        if model_in_out is not None:
            model_in_out.copy_(model_in)
        if eps_out is not None:
            eps_out.copy_(extra["eps"])
        if xc_out is not None:
            xc_out.copy_(extra["xc"])
        return (x_s, x0) if return_x0 else x_s

    if out is None:
        out = torch.empty_like(x)
    if return_x0 and x0_out is None:
        x0_out = torch.empty_like(x)
    if thresholds is not None and (thresholds.dtype != torch.float32 or not thresholds.is_contiguous()):
        thresholds = thresholds.float().contiguous()
    _fused.launch(x, model_output, tab, index, options, n_rows=tab.shape[0], used=used, thresholds=thresholds,
                  noise=noise, seed=seed, index_offset=index_offset, index_run=index_run, aux=aux,
                  history=tuple(history), out=out, x0_out=x0_out, eps_out=eps_out, xc_out=xc_out,
                  model_in_out=model_in_out, **guide)
    return (out, x0_out) if return_x0 else out

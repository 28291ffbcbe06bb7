"""The one step: every sampler, the graph runner and the diffusers drop-ins call ``step``.

``StepOptions`` (frozen, validated once, hashable: graph caches key on it) says how a model
output is read and how the noise is widened; a ``Table`` holds the per-step coefficients;
``step`` validates the tensors of one call and dispatches to the fused Triton kernel or its
plain-torch reference (fastdiff/engine/kernels/fused_step.py). Nothing else builds a step.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from .kernels import fused_step as _fused
from .kernels import philox as _philox
from .backend import resolve
from .predictions import check_prediction
from .tables import NCOL, Table

VAR_MODES = tuple(_fused.VAR_MODES)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    """

    prediction_type: str = "epsilon"
    clip_range: Optional[float] = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    recompute_eps: bool = False
    var_mode: str = "table"
    cov_max: float = 1.0

    def __post_init__(self):
        check_prediction(self.prediction_type)
        if self.clip_range is not None and not (_finite_number(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be > 0 (a finite number, or None for no clamp), got {self.clip_range!r}")
        if self.thresholding:
            r, mx = self.dynamic_thresholding_ratio, self.sample_max_value
            if not (_finite_number(r) and 0.0 < r <= 1.0):
                raise ValueError(f"dynamic_thresholding_ratio must lie in (0, 1], got {r!r}")
            if not (_finite_number(mx) and mx >= 1.0):
                raise ValueError(f"sample_max_value must be a finite number >= 1, got {mx!r}")
        if self.var_mode not in VAR_MODES:
            raise ValueError(f"var_mode must be one of {VAR_MODES}, got {self.var_mode!r}")
        if not (isinstance(self.cov_max, (int, float)) and not isinstance(self.cov_max, bool)
                and self.cov_max > 0):
            raise ValueError(f"cov_max must be a number > 0 (inf for no cap), got {self.cov_max!r}")
        for name in ("thresholding", "recompute_eps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.clip_range is not None:
            object.__setattr__(self, "clip_range", float(self.clip_range))
        object.__setattr__(self, "cov_max", float(self.cov_max))


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


def dynamic_thresholds(x, model_output, table: torch.Tensor, index, options: StepOptions) -> torch.Tensor:
    """Per-sample dynamic-thresholding values s_b: the ``dynamic_thresholding_ratio`` quantile of
    |x0_hat| over each sample, clamped to [1, sample_max_value]; [B], float32 (float64 for
    float64 samples). x0_hat is computed in the table's precision from upcast inputs, so half
    precision inputs do not move s by their rounding."""
    wide = table.dtype == torch.float64 and x.dtype == torch.float64
    plain = StepOptions(prediction_type=options.prediction_type)
    xf = x if wide or x.dtype == torch.float32 else x.float()
    mf = model_output if wide or model_output.dtype == torch.float32 else model_output.float()
    _, x0, _ = _fused.reference(xf, mf, table, index, plain)
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat, options.dynamic_thresholding_ratio, dim=1)
    return s.clamp(min=1.0, max=options.sample_max_value)


def _as_offset(v) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError(f"sample_offset must be >= 0 (an int), got {v!r}")
    return operator.index(v)


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
    out: Optional[torch.Tensor] = None,
    x0_out: Optional[torch.Tensor] = None,
    model_in_out: Optional[torch.Tensor] = None,
    return_x0: bool = False,
    backend: Optional[str] = None,
    **option_kwargs,
):
    """One fused step x_t -> x_s (fastdiff/engine/kernels/fused_step.py has the update).

    Shapes: x, model_output, noise, aux, history tensors, out, x0_out, model_in_out: one shape S
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
    * ``history``: up to two tensors H0, H1 added with the row's c_h0, c_h1.
    * ``thresholds``: explicit per-sample s_b [B]; computed when options.thresholding.
    * ``out`` may be ``x`` (in place); ``x0_out`` receives x0_hat, ``model_in_out`` c_in * x_s.
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
    if len(history) > 2:
        raise ValueError(f"history holds at most 2 tensors (columns c_h0, c_h1), got {len(history)}")
    for j, h in enumerate(history):
        _check_tensor(f"history[{j}]", h, shape, device, wide)
    if type(sample_offset) is not int:
        sample_offset = _as_offset(sample_offset)
    if sample_offset < 0:
        raise ValueError(f"sample_offset must be >= 0 (an int), got {sample_offset!r}")
    if thresholds is not None:
        if len(shape) == 0 or thresholds.shape != (shape[0],):
            raise ValueError(f"thresholds must have shape (batch,) = ({shape[0] if len(shape) else '?'},), "
                             f"got {tuple(thresholds.shape)}")
        if thresholds.device != device:
            raise ValueError(f"thresholds must be on {device}, got {thresholds.device}")
    for name, t in (("out", out), ("x0_out", x0_out), ("model_in_out", model_in_out)):
        if t is not None:
            _check_output(name, t, shape, device, wide)
    if x0_out is not None and (x0_out is out or x0_out is model_in_out) or \
            (model_in_out is not None and model_in_out is out):
        raise ValueError("out, x0_out and model_in_out must be different tensors")
    if options.thresholding and len(shape) < 1:
        raise ValueError("thresholding needs a batch dimension")

    per_sample = math.prod(shape[1:]) if len(shape) > 1 else 1
    if index_offset is None:
        index_offset = sample_offset * per_sample
    elif sample_offset != 0 or isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"index_offset must be an int >= 0, given instead of sample_offset (not both), got "
                         f"index_offset={index_offset!r}, sample_offset={sample_offset}")
    index_run = _philox.check_index_run(index_run, x.numel())
    if _philox.index_end(index_offset, x.numel(), index_run) > 2**62:
        raise ValueError(f"global element indices must stay below 2**62 (they key the noise): sample_offset * "
                         f"elements per sample + elements, got sample_offset={sample_offset} for {per_sample} "
                         f"elements per sample (index_offset {index_offset}, index_run {index_run})")
    if options.thresholding and thresholds is None:
        thresholds = dynamic_thresholds(x, model_output, tab, index, options)

    chosen = table_obj.backend(device, backend) if table_obj is not None else resolve(backend, device)
    used = table_obj.used if table_obj is not None else None
    if wide or chosen == "torch":
        x_s, x0, model_in = _fused.reference(
            x, model_output, tab, index.clamp(0, tab.shape[0] - 1), options, used=used, thresholds=thresholds,
            noise=noise, seed=seed, index_offset=index_offset, index_run=index_run, aux=aux, history=history,
            need_x0=return_x0 or x0_out is not None, need_model_in=model_in_out is not None)
        if out is not None:
            out.copy_(x_s)
            x_s = out
        if x0_out is not None:
            x0_out.copy_(x0)
            x0 = x0_out
        if model_in_out is not None:
            model_in_out.copy_(model_in)
        return (x_s, x0) if return_x0 else x_s

    if out is None:
        out = torch.empty_like(x)
    if return_x0 and x0_out is None:
        x0_out = torch.empty_like(x)
    if thresholds is not None and (thresholds.dtype != torch.float32 or not thresholds.is_contiguous()):
        thresholds = thresholds.float().contiguous()
    _fused.launch(x, model_output, tab, index, options, n_rows=tab.shape[0], used=used, thresholds=thresholds,
                  noise=noise, seed=seed, index_offset=index_offset, index_run=index_run, aux=aux,
                  history=tuple(history), out=out,
                  x0_out=x0_out, model_in_out=model_in_out)
    return (out, x0_out) if return_x0 else out

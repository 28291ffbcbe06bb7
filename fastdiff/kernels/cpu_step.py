"""The fused step on the CPU: ``fastdiff._C.cpu_step``, a C++ loop over raw buffers (csrc/cpu_step.cpp).

The same update as ``vp_step`` (fastdiff/kernels/vp_step.py, whose docstring has the equations),
plus what the coming step layer needs:

* ``prediction_type="flow"``: the model predicts u = eps - x0 on x_t = a_t x0 + b_t eps with
  a_t + b_t = 1, so x0_hat = x_t - b_t u and eps_hat = x_t + a_t u;
* ``history=(h0, h1)``: x_s += c_h0 h0 + c_h1 h1 (columns "c_h0", "c_h1"; multistep solvers);
* ``model_in_out``: also writes c_in * x_s (column "c_in"; the next model input of an Euler sampler).

One pass over memory: each input element is read once and each output written once, with the
in-kernel Philox noise drawn in the same loop (csrc/philox.h: the same 32-bit words as the Triton
kernel and ``philox.normals_torch``). Arithmetic in float32 whatever the dtypes (float32, float16,
bfloat16, mixed), each output rounded once to nearest-even. Threads: ``torch.get_num_threads()``,
one below a size threshold (``fastdiff._C.CPU_PARALLEL_WORK``).

The file holds no kernel of its own (the loops are C++); it validates and hands pointers, dtype
codes and strides over. The reference is ``vp_step_reference``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _ext
from .vp_step import NCOL, VAR_MODES, _check_scalar_index, _check_tensor

_C = _ext.C
PREDICTIONS = dict(_C.CPU_PREDICTIONS)  # epsilon, v_prediction, sample, flow -> the C++ codes
_VAR_CODES = dict(_C.CPU_VAR_MODES)
_DTYPE_CODES = {getattr(torch, name): code for name, code in _C.CPU_DTYPES.items()}
assert set(_VAR_CODES) == set(VAR_MODES), "csrc/cpu_step.cpp and vp_step.py disagree on the variance modes"


def _arg(t: Optional[torch.Tensor]):
    """(data pointer, dtype code, strides) as the C++ side takes a tensor; None stays None."""
    return None if t is None else (t.data_ptr(), _DTYPE_CODES[t.dtype], t.stride())


def cpu_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    table: torch.Tensor,
    step: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    clip_range: Optional[float] = None,
    thresholds: Optional[torch.Tensor] = None,
    recompute_eps: bool = False,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
    sample_offset: int = 0,
    var_mode: str = "table",
    aux: Optional[torch.Tensor] = None,
    cov_max: float = 1.0,
    history: Optional[Sequence[Optional[torch.Tensor]]] = None,
    out: Optional[torch.Tensor] = None,
    x0_out: Optional[torch.Tensor] = None,
    model_in_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One fused step x_t -> x_s on CPU tensors. Shapes: x, model_output, noise, aux, history
    entries, out, x0_out, model_in_out: any shape S (the same for all), dim 0 the batch; table:
    [K, NCOL] float32 or float64 (other dtypes are cast to float32); step, seed: one-element
    int32/int64 tensors, read from memory (the step index picks the table row and keys the noise).

    Arguments as for ``vp_step``; in addition ``prediction_type="flow"``, ``history`` (a sequence
    of at most two tensors, None for an unused slot) and ``model_in_out``. ``out`` (or x0_out,
    model_in_out) may be one of the inputs itself, in place; a different view of an input's storage
    is refused. Returns ``out``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    shape, device = tuple(x.shape), x.device
    if not x.is_cpu:
        raise ValueError(f"cpu_step runs on CPU tensors, got x on {device} (vp_step runs CUDA tensors)")
    _check_tensor("x", x, shape, device)
    _check_tensor("model_output", model_output, shape, device)
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTIONS)}, got {prediction_type!r}")
    if var_mode not in _VAR_CODES:
        raise ValueError(f"var_mode must be one of {tuple(_VAR_CODES)}, got {var_mode!r}")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != NCOL:
        raise ValueError(f"table must be a [K, {NCOL}] tensor, got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    if table.device != device:
        raise ValueError(f"table must be on x's device {device}, got {table.device}")
    if table.dtype not in (torch.float32, torch.float64):
        table = table.float()
    _check_scalar_index("step", step, device)
    if noise is not None and seed is not None:
        raise ValueError("give either noise (a tensor) or seed (in-kernel noise), not both")
    if noise is not None:
        _check_tensor("noise", noise, shape, device)
    if seed is not None:
        _check_scalar_index("seed", seed, device)
    if var_mode != "table":
        if aux is None:
            raise ValueError(f"var_mode={var_mode!r} needs aux (the "
                             f"{'covariance head' if var_mode == 'ocm' else 'variance'} output)")
        _check_tensor("aux", aux, shape, device)
    if thresholds is not None:
        if not isinstance(thresholds, torch.Tensor) or len(shape) == 0 or tuple(thresholds.shape) != (shape[0],):
            got = tuple(thresholds.shape) if isinstance(thresholds, torch.Tensor) else type(thresholds).__name__
            raise ValueError(f"thresholds must have shape (batch,) = ({shape[0] if shape else '?'},), got {got}")
        if thresholds.device != device:
            raise ValueError(f"thresholds must be on {device}, got {thresholds.device}")
        if thresholds.dtype != torch.float32:
            thresholds = thresholds.float()
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if sample_offset < 0:
        raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    h0 = h1 = None
    if history is not None:
        if isinstance(history, torch.Tensor) or len(history) > 2:
            raise ValueError("history must be a sequence of at most two tensors (h0, h1), None for an unused slot")
        h0, h1 = (tuple(history) + (None, None))[:2]
        for i, h in enumerate((h0, h1)):
            if h is not None:
                _check_tensor(f"history[{i}]", h, shape, device)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_tensor("out", out, shape, device)
    if x0_out is not None:
        _check_tensor("x0_out", x0_out, shape, device)
    if model_in_out is not None:
        _check_tensor("model_in_out", model_in_out, shape, device)

    n = x.numel()
    per_sample = n // shape[0] if len(shape) > 0 and shape[0] > 0 else n
    _C.cpu_step(
        shape, _arg(x), _arg(model_output), _arg(aux if var_mode != "table" else None), _arg(noise),
        _arg(h0), _arg(h1), _arg(out), _arg(x0_out), _arg(model_in_out),
        table.data_ptr(), _DTYPE_CODES[table.dtype], table.shape[0], table.shape[1], *table.stride(),
        step.data_ptr(), _DTYPE_CODES[step.dtype], PREDICTIONS[prediction_type],
        None if clip_range is None else float(clip_range),
        0 if thresholds is None else thresholds.data_ptr(), 1 if thresholds is None else thresholds.stride(0),
        bool(recompute_eps), 0 if seed is None else seed.data_ptr(),
        _DTYPE_CODES[seed.dtype] if seed is not None else 0, sample_offset * per_sample,
        _VAR_CODES[var_mode], float(cov_max), torch.get_num_threads())
    return out


def cpu_randn(shape, seed: int, *, step: int = 0, stream: int = 1, index_offset: int = 0,
              dtype: torch.dtype = torch.float32, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``philox.randn`` on the CPU in C++: element i (row-major) is the normal of global index
    ``index_offset + i`` (same 32-bit words as the Triton kernel and the torch implementation)."""
    if out is None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"cpu_randn: dtype must be float32, float16 or bfloat16, got {dtype}")
        out = torch.empty(tuple(int(s) for s in shape), dtype=dtype)
    elif out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cpu_randn: out must be a float32/float16/bfloat16 CPU tensor, got {out.dtype} on {out.device}")
    if index_offset < 0:
        raise ValueError(f"index_offset must be >= 0, got {index_offset}")
    seed = int(seed.reshape(()).item()) if isinstance(seed, torch.Tensor) else int(seed)
    seed = (seed + 2**63) % 2**64 - 2**63  # the key is the seed's low 64 bits, as an int64 tensor holds it
    _C.cpu_randn(tuple(out.shape), _arg(out), seed, index_offset, int(step), int(stream), torch.get_num_threads())
    return out


def available() -> bool:
    """True when the compiled module has the CPU step (always, once built from this tree)."""
    return hasattr(_C, "cpu_step")

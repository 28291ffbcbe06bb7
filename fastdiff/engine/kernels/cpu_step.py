"""The fused step on the CPU: ``fastdiff._C.cpu_step``, a C++ loop over raw buffers (csrc/cpu_step.cpp).

The same update as the Triton kernel (fastdiff/engine/kernels/fused_step.py, whose docstring has
the equations): prediction types incl. flow_prediction, clip / thresholds / recompute-eps, the
four variance modes, history slots (c_h0..c_h3), x0_out, eps_out, the corrected sample xc_out (xc_*
columns), the next model input (c_in) and classifier-free guidance (u, c, w, rescale factors). The raw
model-output term c_m (flow Euler) and a shard's runs of global indices (index_run) too.

One pass over memory: each input element is read once and each output written once, with the
in-kernel Philox noise drawn in the same loop (csrc/philox.h: the same 32-bit words as the Triton
kernel and ``philox.normals_torch``). Arithmetic in float32 whatever the dtypes (float32, float16,
bfloat16, mixed), each output rounded once to nearest-even. Threads: ``torch.get_num_threads()``,
one below a size threshold (``fastdiff._C.CPU_PARALLEL_WORK``).

The file holds no kernel of its own (the loops are C++); it validates and hands pointers, dtype
codes and strides over (``launch``, called by ``fastdiff.engine.step`` with validated inputs).
The reference is ``fused_step.reference``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import _ext
from .fused_step import NCOL, VAR_MODES
from .philox import DTYPE_CODES, tensor_arg

_C = _ext.C
PREDICTIONS = dict(_C.CPU_PREDICTIONS)  # epsilon, v_prediction, sample, flow -> the C++ codes
_VAR_CODES = dict(_C.CPU_VAR_MODES)
assert set(_VAR_CODES) == set(VAR_MODES), "csrc/cpu_step.cpp and fused_step.py disagree on the variance modes"


def launch(x, model_output, table, step, options, *, thresholds=None, noise=None, seed=None, index_offset=0,
           index_run=None, aux=None, history=(), out, x0_out=None, eps_out=None, xc_out=None, model_in_out=None,
           guidance_cond=None, guidance_scale=None, guidance_factor=None):
    """The fused C++ step on CPU tensors ``fastdiff.engine.step`` has validated (the same inputs as
    fused_step.launch, ``index_run`` a shard's (length, stride) runs; ``step`` any row index: the
    C++ side reads the nearest row, as the kernel does; ``guidance_scale`` and ``guidance_factor``
    float32). Writes ``out`` (may be x)."""
    if thresholds is not None and thresholds.dtype != torch.float32:
        thresholds = thresholds.float()
    pred = "flow" if options.prediction_type == "flow_prediction" else options.prediction_type
    _C.cpu_step(
        tuple(x.shape), tensor_arg(x), tensor_arg(model_output), tensor_arg(aux if options.var_mode != "table" else None),
        tensor_arg(noise), [tensor_arg(h) for h in history], tensor_arg(out), tensor_arg(x0_out), tensor_arg(eps_out),
        tensor_arg(xc_out), tensor_arg(model_in_out),
        table.data_ptr(), DTYPE_CODES[table.dtype], table.shape[0], table.shape[1], *table.stride(),
        step.data_ptr(), DTYPE_CODES[step.dtype], PREDICTIONS[pred], options.clip_range,
        0 if thresholds is None else thresholds.data_ptr(), 1 if thresholds is None else thresholds.stride(0),
        bool(options.recompute_eps), 0 if seed is None else seed.data_ptr(),
        DTYPE_CODES[seed.dtype] if seed is not None else 0, int(index_offset),
        _VAR_CODES[options.var_mode], float(options.cov_max), torch.get_num_threads(),
        *(index_run if index_run is not None else (0, 0)), guidance_cond=tensor_arg(guidance_cond),
        guidance_scale=0 if guidance_scale is None else guidance_scale.data_ptr(),
        guidance_factor=0 if guidance_factor is None else guidance_factor.data_ptr(),
        guidance_factor_stride=1 if guidance_factor is None else guidance_factor.stride(0))
    return out


def available() -> bool:
    """True when the compiled module has the CPU step (always, once built from this tree)."""
    return hasattr(_C, "cpu_step")

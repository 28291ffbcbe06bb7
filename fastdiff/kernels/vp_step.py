"""The fused update for the VP family: DDPM, DDIM (any eta), OCM-DDPM / OCM-DDIM, learned-variance
DDPM and multistep consistency sampling are one linear-Gaussian update with per-step
coefficients read from a device table:

    x0_hat, eps_hat = predict(x_t, model_output)          # epsilon / v_prediction / sample
    x0_hat = clamp(x0_hat, -r, r)  or  clamp(x0_hat, -s_b, s_b) / s_b   (dynamic thresholding)
    x_s = c_x0 * x0_hat + c_eps * eps_hat + c_xt * x_t + std_ * z

with ``std_`` the table's std (VAR_MODE 0), sqrt(std**2 + c_cov**2 * Sigma0) with the OCM
posterior variance Sigma0 = clamp(cov_scale * (1 + h), 0, cov_max) (VAR_MODE 1), or the model's
learned variance (VAR_MODE 2: learned_range interpolation in log space, 3: the variance
itself). Columns are defined in csrc/schedules.cpp and named in ``COL`` below.

The file holds, in order: the kernel, its launcher ``vp_step`` (validation, layout handling,
backend choice) and the plain-torch reference ``vp_step_reference``, which is also the CPU path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from ..backend import interpreting, resolve
from . import philox
from .philox import STREAM_STEP, triton

if triton is not None:
    from .philox import normal_block

if triton is not None:
    import triton.language as tl

COLUMNS = _ext.C.COLUMNS
NCOL = _ext.C.NCOL
COL = {name: i for i, name in enumerate(COLUMNS)}

if triton is not None:
    NAN = tl.constexpr(tl.PropagateNan.ALL)
    # Table columns by name (csrc/columns.h is the one list; a name missing there fails here).
    COL_A_T = tl.constexpr(COL["a_t"])
    COL_B_T = tl.constexpr(COL["b_t"])
    COL_C_X0 = tl.constexpr(COL["c_x0"])
    COL_C_EPS = tl.constexpr(COL["c_eps"])
    COL_C_XT = tl.constexpr(COL["c_xt"])
    COL_STD = tl.constexpr(COL["std"])
    COL_C_COV = tl.constexpr(COL["c_cov"])
    COL_COV_SCALE = tl.constexpr(COL["cov_scale"])
    COL_LOG_VAR_MIN = tl.constexpr(COL["log_var_min"])
    COL_LOG_VAR_MAX = tl.constexpr(COL["log_var_max"])
    COL_VAR_MAX = tl.constexpr(COL["var_max"])
    COL_NOISE = tl.constexpr(COL["noise"])

PREDICTIONS = {"epsilon": 0, "v_prediction": 1, "sample": 2}
VAR_MODES = {"table": 0, "ocm": 1, "learned_range": 2, "learned": 3}
NOISE_MODES = {"none": 0, "tensor": 1, "philox": 2}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _offsets(local, D1, D2, D3, s0, s1, s2, s3, STRIDED: tl.constexpr):
        # Logical row-major index -> memory offset of a (rank <= 4) strided tensor.
        # STRIDED: 0 dense (the index is the offset), 1 strided in int64, 2 strided in int32 (the
        # launcher checked every offset fits; 64-bit div/mod costs several times the 32-bit ones).
        if STRIDED != 0:
            if STRIDED == 2:
                local = local.to(tl.int32)
            i3 = local % D3
            r = local // D3
            i2 = r % D2
            r = r // D2
            i1 = r % D1
            i0 = r // D1
            return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
        else:
            return local

    @triton.jit
    def _vp_step_kernel(
        x_ptr, m_ptr, aux_ptr, z_ptr, thr_ptr, out_ptr, x0_ptr,
        table_ptr, step_ptr, seed_ptr,
        n, g_base, per_sample, clip_range, cov_max,
        D1, D2, D3,
        sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3, sa0, sa1, sa2, sa3,
        sz0, sz1, sz2, sz3, so0, so1, so2, so3, sp0, sp1, sp2, sp3,
        PRED: tl.constexpr, CLIP: tl.constexpr, THRESH: tl.constexpr, RECOMPUTE_EPS: tl.constexpr,
        NOISE: tl.constexpr, VAR_MODE: tl.constexpr, WRITE_X0: tl.constexpr, STRIDED: tl.constexpr,
        NCOL: tl.constexpr, BLOCK: tl.constexpr, SHIFT: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        # int64 offsets: tensors past 2**31 elements (Invariant 6).
        # SHIFT (0..3) aligns the Philox groups of four to global indices; a constexpr so that
        # the common SHIFT = 0 keeps offsets provably aligned and the loads vectorized.
        local = pid * BLOCK - SHIFT + tl.arange(0, BLOCK).to(tl.int64)
        mask = (local >= 0) & (local < n)

        # Per-step scalars from the device table: the launch carries no per-step host value.
        step = tl.load(step_ptr)
        row = table_ptr + step.to(tl.int64) * NCOL
        a_t = tl.load(row + COL_A_T)
        sig_t = tl.load(row + COL_B_T)
        c_x0 = tl.load(row + COL_C_X0)
        c_eps = tl.load(row + COL_C_EPS)
        c_xt = tl.load(row + COL_C_XT)
        std = tl.load(row + COL_STD)

        x = tl.load(x_ptr + _offsets(local, D1, D2, D3, sx0, sx1, sx2, sx3, STRIDED), mask=mask,
                    other=0.0).to(tl.float32)
        m = tl.load(m_ptr + _offsets(local, D1, D2, D3, sm0, sm1, sm2, sm3, STRIDED), mask=mask,
                    other=0.0).to(tl.float32)

        if PRED == 0:  # epsilon
            x0 = (x - sig_t * m) / a_t
            eps = m
        elif PRED == 1:  # v_prediction
            x0 = a_t * x - sig_t * m
            eps = a_t * m + sig_t * x
        else:  # sample
            x0 = m
            eps = (x - a_t * m) / sig_t

        if THRESH:
            s = tl.load(thr_ptr + local // per_sample, mask=mask, other=1.0).to(tl.float32)
            x0 = tl.minimum(tl.maximum(x0, -s, propagate_nan=NAN), s, propagate_nan=NAN) / s
        elif CLIP:
            # propagate_nan: a NaN from the model must stay NaN (as torch.clamp keeps it), not
            # come out as -clip_range.
            x0 = tl.minimum(tl.maximum(x0, -clip_range, propagate_nan=NAN), clip_range, propagate_nan=NAN)
        if RECOMPUTE_EPS:
            eps = (x - a_t * x0) / sig_t

        x_s = c_x0 * x0 + c_eps * eps + c_xt * x

        if NOISE != 0:
            if NOISE == 1:
                z = tl.load(z_ptr + _offsets(local, D1, D2, D3, sz0, sz1, sz2, sz3, STRIDED), mask=mask,
                            other=0.0).to(tl.float32)
            else:
                z = normal_block(tl.load(seed_ptr), g_base + pid * BLOCK, step, 0, BLOCK)
            if VAR_MODE == 0:
                x_s = x_s + std * z
            else:
                noise_on = tl.load(row + COL_NOISE)
                aux = tl.load(aux_ptr + _offsets(local, D1, D2, D3, sa0, sa1, sa2, sa3, STRIDED),
                              mask=mask, other=0.0).to(tl.float32)
                if VAR_MODE == 1:  # OCM: widen by the posterior variance of x0_hat
                    c_cov = tl.load(row + COL_C_COV)
                    cov_scale = tl.load(row + COL_COV_SCALE)
                    var_max = tl.load(row + COL_VAR_MAX)
                    sigma0 = tl.minimum(tl.maximum(cov_scale * (1.0 + aux), 0.0, propagate_nan=NAN), cov_max,
                                        propagate_nan=NAN)
                    var = tl.minimum(std * std + c_cov * c_cov * sigma0, var_max, propagate_nan=NAN)
                    noise_std = tl.sqrt(var)
                elif VAR_MODE == 2:  # learned_range: interpolate log-variance between the bounds
                    lo = tl.load(row + COL_LOG_VAR_MIN)
                    hi = tl.load(row + COL_LOG_VAR_MAX)
                    frac = (aux + 1.0) * 0.5
                    noise_std = tl.exp(0.5 * (frac * hi + (1.0 - frac) * lo))
                else:  # learned: the model outputs the variance
                    noise_std = tl.sqrt(aux)
                x_s = x_s + noise_on * noise_std * z

        tl.store(out_ptr + _offsets(local, D1, D2, D3, so0, so1, so2, so3, STRIDED),
                 x_s.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + _offsets(local, D1, D2, D3, sp0, sp1, sp2, sp3, STRIDED),
                     x0.to(x0_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launcher


def _canonical_dims(shape):
    """Pad a shape to rank 4 (leading ones); None when it has more than 4 dimensions."""
    if len(shape) > 4:
        return None
    return (1,) * (4 - len(shape)) + tuple(shape)


def _dense_same_layout(tensors, shape, n) -> bool:
    """Every tensor has the first one's strides, those strides tile a dense, non-overlapping block
    of memory, and dim 0 is outermost (so storage index // per_sample is still the sample)."""
    present = [t for t in tensors if t is not None]
    ref = present[0].stride()
    if any(t.stride() != ref for t in present):
        return False
    expected = 1
    for st, sz in sorted((st, sz) for st, sz in zip(ref, shape) if sz != 1):
        if st != expected:
            return False
        expected *= sz
    return len(shape) == 0 or shape[0] <= 1 or ref[0] == n // shape[0]


def _fits_int32(tensors, index_bound: int) -> bool:
    """Logical indices below ``index_bound`` and every tensor's largest element offset fit int32."""
    if index_bound >= 2**31:
        return False
    for t in tensors:
        if t is not None and sum((sz - 1) * abs(st) for sz, st in zip(t.shape, t.stride())) >= 2**31:
            return False
    return True


def _strides4(t: torch.Tensor):
    st = tuple(t.stride())
    return (0,) * (4 - len(st)) + st


def _check_tensor(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"x and {name} must have the same shape, got {tuple(shape)} and {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"x and {name} must be on the same device, got {device} and {t.device}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_scalar_index(name, t, device):
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a one-element int32/int64 tensor on the device "
                         f"(it is read by the kernel, so a captured launch needs no host value)")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def vp_step(
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
    out: Optional[torch.Tensor] = None,
    x0_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One fused step x_t -> x_s. Shapes: x, model_output, noise, aux, out, x0_out: any shape S
    (the same for all), dim 0 the batch; table: [K, NCOL] float32 on x's device; step, seed:
    one-element int tensors on the device.

    * ``noise`` (tensor, same shape) or ``seed`` (in-kernel Philox keyed by seed, global element
      index and the step index) or neither (no noise term). ``sample_offset`` is the global index
      of x[0] so that splitting a batch across calls gives the same noise.
    * ``var_mode``: "table" (std column), "ocm" (``aux`` = h, the head's output), "learned_range"
      or "learned" (``aux`` = the model's variance output).
    * ``thresholds``: [B] per-sample dynamic-thresholding values s_b (x0 -> clamp(x0,-s,s)/s);
      otherwise ``clip_range`` clamps x0 to [-r, r].
    * ``out`` may be ``x`` itself (in place). Returns ``out``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    shape, device = tuple(x.shape), x.device
    _check_tensor("x", x, shape, device)
    _check_tensor("model_output", model_output, shape, device)
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTIONS)}, got {prediction_type!r}")
    if var_mode not in VAR_MODES:
        raise ValueError(f"var_mode must be one of {tuple(VAR_MODES)}, got {var_mode!r}")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != NCOL:
        raise ValueError(f"table must be a [K, {NCOL}] tensor, got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    if table.device != device:
        raise ValueError(f"table must be on x's device {device}, got {table.device}")
    _check_scalar_index("step", step, device)
    if noise is not None and seed is not None:
        raise ValueError("give either noise (a tensor) or seed (in-kernel noise), not both")
    if noise is not None:
        _check_tensor("noise", noise, shape, device)
    if seed is not None:
        _check_scalar_index("seed", seed, device)
        seed = seed.to(torch.int64)
    if var_mode != "table":
        if aux is None:
            raise ValueError(f"var_mode={var_mode!r} needs aux (the {'covariance head' if var_mode == 'ocm' else 'variance'} output)")
        _check_tensor("aux", aux, shape, device)
    if thresholds is not None:
        if len(shape) == 0 or thresholds.shape != (shape[0],):
            raise ValueError(f"thresholds must have shape (batch,) = ({shape[0] if shape else '?'},), "
                             f"got {tuple(thresholds.shape)}")
        if thresholds.device != device:
            raise ValueError(f"thresholds must be on {device}, got {thresholds.device}")
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if sample_offset < 0:
        raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_tensor("out", out, shape, device)
    if x0_out is not None:
        _check_tensor("x0_out", x0_out, shape, device)

    if resolve(backend, device) == "torch":
        res, x0 = vp_step_reference(
            x, model_output, table, step, prediction_type=prediction_type, clip_range=clip_range,
            thresholds=thresholds, recompute_eps=recompute_eps, noise=noise, seed=seed,
            sample_offset=sample_offset, var_mode=var_mode, aux=aux, cov_max=cov_max,
            need_x0=x0_out is not None)
        if x0_out is not None:
            x0_out.copy_(x0)
        out.copy_(res)
        return out

    n = x.numel()
    if n == 0:
        return out
    per_sample = n // shape[0] if len(shape) > 0 and shape[0] > 0 else max(n, 1)
    tensors = [x, model_output, aux, noise, out, x0_out]
    dims = _canonical_dims(shape)
    strided = any(t is not None and not t.is_contiguous() for t in tensors)
    if strided and seed is None and _dense_same_layout(tensors, shape, n):
        # e.g. everything channels_last: an elementwise update may walk memory in storage order,
        # without the per-element index arithmetic (64-bit div/mod) of the strided path. Not
        # with in-kernel noise, which is keyed by the logical row-major index.
        strided = False
    if strided and dims is None:
        # More than 4 dimensions and not contiguous: gather into contiguous copies.
        x, model_output = x.contiguous(), model_output.contiguous()
        aux = aux.contiguous() if aux is not None else None
        noise = noise.contiguous() if noise is not None else None
        final_out, out = out, (out if out.is_contiguous() else torch.empty_like(x))
        final_x0, x0_out = x0_out, (x0_out if x0_out is None or x0_out.is_contiguous() else torch.empty_like(x))
        vp_step(x, model_output, table, step, prediction_type=prediction_type, clip_range=clip_range,
                thresholds=thresholds, recompute_eps=recompute_eps, noise=noise, seed=seed,
                sample_offset=sample_offset, var_mode=var_mode, aux=aux, cov_max=cov_max, out=out,
                x0_out=x0_out, backend="triton")
        if final_out is not out:
            final_out.copy_(out)
        if final_x0 is not None and final_x0 is not x0_out:
            final_x0.copy_(x0_out)
        return final_out
    if dims is None:
        dims = (1, 1, 1, n)
    strides = [(_strides4(t) if strided else (0, 0, 0, 1)) if t is not None else (0, 0, 0, 0) for t in tensors]

    g0 = sample_offset * per_sample  # global index of x's first element
    shift = g0 % 4
    block, warps = _launch_config(n)
    dummy = x  # never dereferenced: the flags keep the kernel from touching it
    grid = (-(-(n + shift) // block),)  # plain ints: triton.cdiv is a jit function, ~4 us a call
    # The kernel indexes the table and the thresholds as dense arrays: make sure they are.
    table_f32 = table.float().contiguous()
    if thresholds is not None:
        thresholds = thresholds.float().contiguous()
    _vp_step_kernel[grid](
        x, model_output, aux if aux is not None else dummy, noise if noise is not None else dummy,
        thresholds if thresholds is not None else dummy, out, x0_out if x0_out is not None else dummy,
        table_f32, step, seed if seed is not None else step,
        n, g0 - shift, per_sample, float(clip_range or 1.0), float(cov_max),
        dims[1], dims[2], dims[3],
        *strides[0], *strides[1], *strides[2], *strides[3], *strides[4], *strides[5],
        PRED=PREDICTIONS[prediction_type], CLIP=clip_range is not None, THRESH=thresholds is not None,
        RECOMPUTE_EPS=bool(recompute_eps),
        NOISE=1 if noise is not None else (2 if seed is not None else 0),
        VAR_MODE=VAR_MODES[var_mode], WRITE_X0=x0_out is not None,
        STRIDED=(2 if _fits_int32(tensors, n + block) else 1) if strided else 0,
        NCOL=NCOL, BLOCK=block, SHIFT=shift, num_warps=warps,
    )
    return out


def _launch_config(n: int):
    if interpreting():
        # Each interpreted program costs ~10 ms whatever its size: few, large programs.
        return max(64, min(1 << 16, 1 << (n - 1).bit_length())), 4
    # Elementwise and memory-bound: 2048 elements per program, 8 elements per thread at 8 warps
    # gives 16-byte fp16/bf16 and 32-byte fp32 accesses per thread.
    return 2048, 8


# --------------------------------------------------------------------------------------------
# reference


def vp_step_reference(
    x, model_output, table, step, *, prediction_type="epsilon", clip_range=None, thresholds=None,
    recompute_eps=False, noise=None, seed=None, sample_offset=0, var_mode="table", aux=None,
    cov_max=1.0, need_x0=True,
):
    """Plain-torch version of the kernel, in float32 (float64 if the table is float64).
    Returns (x_s in x's dtype, x0_hat in x's dtype or None when ``need_x0`` is False). No host
    sync: the step row is gathered on the device and every coefficient stays a 0-d tensor."""
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {tuple(PREDICTIONS)}, got {prediction_type!r}")
    cdt = torch.float64 if table.dtype == torch.float64 else torch.float32
    row = table.to(cdt).index_select(0, step.reshape(1).long()).reshape(NCOL)
    a_t, sig_t, c_x0, c_eps, c_xt, std = (row[COL[k]] for k in ("a_t", "b_t", "c_x0", "c_eps", "c_xt", "std"))
    xf, m = x.to(cdt), model_output.to(cdt)
    # The kernel's arithmetic in the kernel's order (x0_hat first, then the combination), with
    # in-place ops where they save a pass. Folding the update into p * x_t + q * model_output
    # would save two more passes but loses ~2-3x precision when 1/sqrt(ab_t) is large (t near T).
    if prediction_type == "epsilon":
        x0, eps = torch.addcmul(xf, m, -sig_t).div_(a_t), m
    elif prediction_type == "v_prediction":
        x0, eps = torch.addcmul(a_t * xf, m, -sig_t), torch.addcmul(a_t * m, xf, sig_t)
    else:
        x0, eps = m, torch.addcmul(xf, m, -a_t).div_(sig_t)
    if thresholds is not None:
        s = thresholds.to(cdt).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.minimum(torch.maximum(x0, -s), s).div_(s)
    elif clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    if recompute_eps:
        eps = torch.addcmul(xf, x0, -a_t).div_(sig_t)
    x_s = (c_x0 * x0).addcmul_(eps, c_eps).addcmul_(xf, c_xt)
    if noise is not None or seed is not None:
        if noise is not None:
            z = noise.to(cdt)
        else:
            per_sample = x.numel() // x.shape[0] if x.dim() > 0 and x.shape[0] > 0 else x.numel()
            z = philox.normals_range(seed.reshape(()), sample_offset * per_sample, x.numel(),
                                     step.reshape(()).long(), STREAM_STEP, x.device).view(x.shape).to(cdt)
        if var_mode == "table":
            x_s = x_s.addcmul_(z, std)
        else:
            a = aux.to(cdt)
            noise_on = row[COL["noise"]]
            if var_mode == "ocm":
                sigma0 = (row[COL["cov_scale"]] * (1.0 + a)).clamp(0.0, cov_max)
                var = torch.minimum(std * std + row[COL["c_cov"]] ** 2 * sigma0, row[COL["var_max"]])
                noise_std = var.sqrt()
            elif var_mode == "learned_range":
                frac = (a + 1.0) * 0.5
                noise_std = torch.exp(0.5 * (frac * row[COL["log_var_max"]] + (1.0 - frac) * row[COL["log_var_min"]]))
            else:
                noise_std = a.sqrt()
            x_s = x_s + noise_on * noise_std * z
    return x_s.to(x.dtype), (x0.to(x.dtype) if need_x0 else None)


def dynamic_thresholds(x, model_output, table, step, prediction_type="epsilon", ratio=0.995, max_value=1.0):
    """Per-sample dynamic-thresholding values s_b (Saharia et al., 2022, Imagen): the ``ratio``
    quantile of |x0_hat| over each sample, clamped to [1, max_value]. [B] float32.

    This is the one extra pass a thresholded step makes (the quantile needs all of x0_hat
    before any element can be updated); the update itself stays one fused launch."""
    wide = table.dtype == torch.float64 and x.dtype == torch.float64  # float64 samples stay float64
    _, x0 = vp_step_reference(x, model_output, table if wide else table.float(), step,
                              prediction_type=prediction_type)
    flat = (x0 if wide else x0.float()).reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat, ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)

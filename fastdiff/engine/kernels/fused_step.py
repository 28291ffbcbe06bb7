"""The one fused solver step. Every sampler is a row of coefficients read from a device table
(csrc/columns.h names the columns; docs/design.md derives them):

    m = u + w (c - u)   (times f_b)                    # optional: classifier-free guidance
    x0_hat, eps_hat = predict(x_t, m)                  # epsilon / v_prediction / sample / flow_prediction
    x0_hat = clamp(x0_hat, -r, r)  or  clamp(x0_hat, -s_b, s_b) / s_b   (dynamic thresholding)
    x_s = c_x0 x0_hat + c_eps eps_hat + c_xt x_t + c_m m + sum_k c_hk Hk + std_ z
    model_in = c_in x_s                                  (optional: the next model input, scaled)
    x_c = xc_xt x_t + xc_x0 x0_hat + xc_eps eps_hat + sum_k xc_hk Hk   (optional: a corrected sample)

with ``std_`` the table's std (var mode "table"), sqrt(min(std^2 + c_cov^2 Sigma0, var_max)) with
the OCM posterior variance Sigma0 = clamp(cov_scale (1 + h), 0, cov_max) ("ocm"), or the model's
learned variance ("learned_range": log-space interpolation, "learned": the variance itself).
m is the model output as it came (flow Euler is x_t + (sigma_s - sigma_t) u, computed in that form), or
with guidance the combination of the unconditional output u (``model_output``) and the conditional
c (``guidance_cond``) with the scale w read from device memory, times a per-sample rescale factor
f_b computed before the step (``step.guidance_factors``), before anything else reads it;
H0..H3 are history tensors a multistep solver keeps; x0_hat and eps_hat can be written out for the
next step, and x_c, the second combination of the same inputs, is the corrected sample UniPC's
corrector produces (its predictor's x_s is computed from the same loads, in the same pass).

The file holds, in order: the Triton kernel, its launcher ``launch`` (layout and launch only:
``fastdiff.engine.step`` validates every input once before calling it) and the plain-torch
``reference`` of the same update, which is the readable spec and the path for other devices.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ... import _ext
from ..backend import interpreting
from ..predictions import PREDICTION_CODES, x0_eps
from . import philox
from .philox import STREAM_STEP, triton

COLUMNS = _ext.C.COLUMNS
NCOL = _ext.C.NCOL
COL = {name: i for i, name in enumerate(COLUMNS)}

VAR_MODES = {"table": 0, "ocm": 1, "learned_range": 2, "learned": 3}
NOISE_MODES = {"none": 0, "tensor": 1, "philox": 2, "philox_run": 3}
# The tensors a step reads or writes, in the order of the kernel's pointer arguments and of the
# rows of its stride table.
TENSORS = ("x", "model_output", "aux", "noise", "h0", "h1", "h2", "h3", "out", "x0_out", "eps_out", "xc_out",
           "model_in_out", "guidance_cond")
HISTORY_COLUMNS = ("c_h0", "c_h1", "c_h2", "c_h3")
XC_COLUMNS = ("xc_xt", "xc_x0", "xc_eps", "xc_h0", "xc_h1", "xc_h2", "xc_h3")
MAX_HISTORY = len(HISTORY_COLUMNS)

if triton is not None:
    import triton.language as tl

    from .philox import normal_at, normal_block

    NAN = tl.constexpr(tl.PropagateNan.ALL)
    # Table columns by name (csrc/columns.h is the one list; a name missing there fails here).
    COL_A_T = tl.constexpr(COL["a_t"])
    COL_B_T = tl.constexpr(COL["b_t"])
    COL_C_X0 = tl.constexpr(COL["c_x0"])
    COL_C_EPS = tl.constexpr(COL["c_eps"])
    COL_C_XT = tl.constexpr(COL["c_xt"])
    COL_C_M = tl.constexpr(COL["c_m"])
    COL_C_H0 = tl.constexpr(COL["c_h0"])
    COL_C_H1 = tl.constexpr(COL["c_h1"])
    COL_C_H2 = tl.constexpr(COL["c_h2"])
    COL_C_H3 = tl.constexpr(COL["c_h3"])
    COL_XC_XT = tl.constexpr(COL["xc_xt"])
    COL_XC_X0 = tl.constexpr(COL["xc_x0"])
    COL_XC_EPS = tl.constexpr(COL["xc_eps"])
    COL_XC_H0 = tl.constexpr(COL["xc_h0"])
    COL_XC_H1 = tl.constexpr(COL["xc_h1"])
    COL_XC_H2 = tl.constexpr(COL["xc_h2"])
    COL_XC_H3 = tl.constexpr(COL["xc_h3"])
    COL_STD = tl.constexpr(COL["std"])
    COL_C_COV = tl.constexpr(COL["c_cov"])
    COL_COV_SCALE = tl.constexpr(COL["cov_scale"])
    COL_LOG_VAR_MIN = tl.constexpr(COL["log_var_min"])
    COL_LOG_VAR_MAX = tl.constexpr(COL["log_var_max"])
    COL_VAR_MAX = tl.constexpr(COL["var_max"])
    COL_NOISE = tl.constexpr(COL["noise"])
    COL_C_IN = tl.constexpr(COL["c_in"])
    NCOL_K = tl.constexpr(NCOL)
    # Rows of the stride table (TENSORS order).
    T_X = tl.constexpr(0)
    T_M = tl.constexpr(1)
    T_AUX = tl.constexpr(2)
    T_Z = tl.constexpr(3)
    T_H0 = tl.constexpr(4)
    T_H1 = tl.constexpr(5)
    T_H2 = tl.constexpr(6)
    T_H3 = tl.constexpr(7)
    T_OUT = tl.constexpr(8)
    T_X0 = tl.constexpr(9)
    T_EPS = tl.constexpr(10)
    T_XC = tl.constexpr(11)
    T_IN = tl.constexpr(12)
    T_G = tl.constexpr(13)

    @triton.jit
    def _offsets(local, dims_ptr, strides_ptr, WHICH: tl.constexpr, STRIDED: tl.constexpr):
        # Logical row-major index -> memory offset of tensor WHICH (rank <= 4, padded with leading
        # ones). STRIDED: 0 dense (the index is the offset), 1 strided in int64, 2 strided in int32
        # (the launcher checked every offset fits; 64-bit div/mod costs several times the 32-bit).
        if STRIDED != 0:
            d1 = tl.load(dims_ptr + 1)
            d2 = tl.load(dims_ptr + 2)
            d3 = tl.load(dims_ptr + 3)
            s0 = tl.load(strides_ptr + WHICH * 4 + 0)
            s1 = tl.load(strides_ptr + WHICH * 4 + 1)
            s2 = tl.load(strides_ptr + WHICH * 4 + 2)
            s3 = tl.load(strides_ptr + WHICH * 4 + 3)
            if STRIDED == 2:
                local = local.to(tl.int32)
                d1 = d1.to(tl.int32)
                d2 = d2.to(tl.int32)
                d3 = d3.to(tl.int32)
                s0 = s0.to(tl.int32)
                s1 = s1.to(tl.int32)
                s2 = s2.to(tl.int32)
                s3 = s3.to(tl.int32)
            i3 = local % d3
            r = local // d3
            i2 = r % d2
            r = r // d2
            i1 = r % d1
            i0 = r // d1
            return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3
        else:
            return local

    @triton.jit
    def _fused_step_kernel(
        x_ptr, m_ptr, aux_ptr, z_ptr, h0_ptr, h1_ptr, h2_ptr, h3_ptr, out_ptr, x0_ptr, eps_ptr, xc_ptr, in_ptr, g_ptr,
        thr_ptr, table_ptr, step_ptr, seed_ptr, layout_ptr, gs_ptr, gf_ptr,
        n, g_base, per_sample, clip_range, cov_max, n_rows, run_len, run_stride,
        PRED: tl.constexpr, CLIP: tl.constexpr, THRESH: tl.constexpr, RECOMPUTE_EPS: tl.constexpr,
        NOISE: tl.constexpr, VAR_MODE: tl.constexpr, RAW_M: tl.constexpr, N_HIST: tl.constexpr, WRITE_X0: tl.constexpr,
        WRITE_EPS: tl.constexpr, WRITE_XC: tl.constexpr, WRITE_IN: tl.constexpr, STRIDED: tl.constexpr, BLOCK: tl.constexpr, SHIFT: tl.constexpr,
        GUIDE: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        # int64 offsets: tensors past 2**31 elements (invariant 6 of docs/design.md).
        # SHIFT (0..3) aligns the Philox groups of four to global indices; a constexpr so that
        # the common SHIFT = 0 keeps offsets provably aligned and the loads vectorized.
        local = pid * BLOCK - SHIFT + tl.arange(0, BLOCK).to(tl.int64)
        mask = (local >= 0) & (local < n)
        dims = layout_ptr          # layout: [4 dims, then 4 strides per tensor of TENSORS]
        strides = layout_ptr + 4

        # Per-step scalars from the device table: the launch carries no per-step host value.
        # An index outside the table is clamped to its nearest row: never read past the table.
        step = tl.minimum(tl.maximum(tl.load(step_ptr).to(tl.int64), 0), n_rows - 1)
        row = table_ptr + step.to(tl.int64) * NCOL_K
        a_t = tl.load(row + COL_A_T)
        b_t = tl.load(row + COL_B_T)
        c_x0 = tl.load(row + COL_C_X0)
        c_eps = tl.load(row + COL_C_EPS)
        c_xt = tl.load(row + COL_C_XT)
        std = tl.load(row + COL_STD)

        x = tl.load(x_ptr + _offsets(local, dims, strides, T_X, STRIDED), mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + _offsets(local, dims, strides, T_M, STRIDED), mask=mask, other=0.0).to(tl.float32)
        if GUIDE != 0:  # classifier-free guidance: m = u + w (c - u), GUIDE 2 times the rescale factor f_b
            c = tl.load(g_ptr + _offsets(local, dims, strides, T_G, STRIDED), mask=mask, other=0.0).to(tl.float32)
            m = m + tl.load(gs_ptr).to(tl.float32) * (c - m)
            if GUIDE == 2:
                m = m * tl.load(gf_ptr + local // per_sample, mask=mask, other=1.0).to(tl.float32)

        if PRED == 0:  # epsilon
            x0 = (x - b_t * m) / a_t
            eps = m
        elif PRED == 1:  # v_prediction
            x0 = a_t * x - b_t * m
            eps = a_t * m + b_t * x
        elif PRED == 2:  # sample
            x0 = m
            eps = (x - a_t * m) / b_t
        else:  # flow_prediction: u = eps - x0 on a + b = 1
            x0 = x - b_t * m
            eps = x + a_t * m

        if THRESH:
            s = tl.load(thr_ptr + local // per_sample, mask=mask, other=1.0).to(tl.float32)
            x0 = tl.minimum(tl.maximum(x0, -s, propagate_nan=NAN), s, propagate_nan=NAN) / s
        elif CLIP:
            # propagate_nan: a NaN from the model must stay NaN (as torch.clamp keeps it), not
            # come out as -clip_range.
            x0 = tl.minimum(tl.maximum(x0, -clip_range, propagate_nan=NAN), clip_range, propagate_nan=NAN)
        if RECOMPUTE_EPS:
            eps = (x - a_t * x0) / b_t

        x_s = c_x0 * x0 + c_eps * eps + c_xt * x
        if RAW_M:
            x_s = x_s + tl.load(row + COL_C_M) * m
        if WRITE_XC:
            x_c = tl.load(row + COL_XC_XT) * x + tl.load(row + COL_XC_X0) * x0 + tl.load(row + COL_XC_EPS) * eps
        if N_HIST >= 1:
            h0 = tl.load(h0_ptr + _offsets(local, dims, strides, T_H0, STRIDED), mask=mask,
                         other=0.0).to(tl.float32)
            x_s = x_s + tl.load(row + COL_C_H0) * h0
            if WRITE_XC:
                x_c = x_c + tl.load(row + COL_XC_H0) * h0
        if N_HIST >= 2:
            h1 = tl.load(h1_ptr + _offsets(local, dims, strides, T_H1, STRIDED), mask=mask,
                         other=0.0).to(tl.float32)
            x_s = x_s + tl.load(row + COL_C_H1) * h1
            if WRITE_XC:
                x_c = x_c + tl.load(row + COL_XC_H1) * h1
        if N_HIST >= 3:
            h2 = tl.load(h2_ptr + _offsets(local, dims, strides, T_H2, STRIDED), mask=mask,
                         other=0.0).to(tl.float32)
            x_s = x_s + tl.load(row + COL_C_H2) * h2
            if WRITE_XC:
                x_c = x_c + tl.load(row + COL_XC_H2) * h2
        if N_HIST >= 4:
            h3 = tl.load(h3_ptr + _offsets(local, dims, strides, T_H3, STRIDED), mask=mask,
                         other=0.0).to(tl.float32)
            x_s = x_s + tl.load(row + COL_C_H3) * h3
            if WRITE_XC:
                x_c = x_c + tl.load(row + COL_XC_H3) * h3

        if NOISE != 0:
            if NOISE == 1:
                z = tl.load(z_ptr + _offsets(local, dims, strides, T_Z, STRIDED), mask=mask,
                            other=0.0).to(tl.float32)
            elif NOISE == 2:
                z = normal_block(tl.load(seed_ptr), g_base + pid * BLOCK, step, 0, BLOCK)
            else:  # a slice of a larger tensor: runs of run_len global indices, run_stride apart
                g = g_base + (local // run_len) * run_stride + local % run_len
                z = normal_at(tl.load(seed_ptr), g, step, 0)
            if VAR_MODE == 0:
                x_s = x_s + std * z
            else:
                noise_on = tl.load(row + COL_NOISE)
                aux = tl.load(aux_ptr + _offsets(local, dims, strides, T_AUX, STRIDED), mask=mask,
                              other=0.0).to(tl.float32)
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

        tl.store(out_ptr + _offsets(local, dims, strides, T_OUT, STRIDED), x_s.to(out_ptr.dtype.element_ty),
                 mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + _offsets(local, dims, strides, T_X0, STRIDED), x0.to(x0_ptr.dtype.element_ty),
                     mask=mask)
        if WRITE_EPS:
            tl.store(eps_ptr + _offsets(local, dims, strides, T_EPS, STRIDED), eps.to(eps_ptr.dtype.element_ty),
                     mask=mask)
        if WRITE_XC:
            tl.store(xc_ptr + _offsets(local, dims, strides, T_XC, STRIDED), x_c.to(xc_ptr.dtype.element_ty),
                     mask=mask)
        if WRITE_IN:
            c_in = tl.load(row + COL_C_IN)
            tl.store(in_ptr + _offsets(local, dims, strides, T_IN, STRIDED),
                     (c_in * x_s).to(in_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launcher


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


# Layout tables (dims and strides) of strided launches, per device: made once per layout, so a
# captured launch reads a tensor that already exists (a host-to-device copy cannot be captured).
_LAYOUTS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_MAX_LAYOUTS = 64


def _layout_tensor(shape, tensors, device) -> torch.Tensor:
    dims = (1,) * (4 - len(shape)) + tuple(shape)
    rows = []
    for t in tensors:
        st = tuple(t.stride()) if t is not None else (0,) * len(shape)
        rows.extend((0,) * (4 - len(st)) + st)
    key = (device, dims, tuple(rows))
    lay = _LAYOUTS.get(key)
    if lay is None:
        lay = torch.tensor(list(dims) + rows, dtype=torch.int64).to(device)
        _LAYOUTS[key] = lay
        while len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    return lay


def launch(x, model_output, table, step, options, *, n_rows, used=None, thresholds=None, noise=None, seed=None,
           index_offset=0, index_run=None, aux=None, history=(), out, x0_out=None, eps_out=None, xc_out=None,
           model_in_out=None, guidance_cond=None, guidance_scale=None, guidance_factor=None):
    """Launch the kernel on inputs ``fastdiff.engine.step`` has validated: every tensor of x's
    shape S (any strides, rank <= 4 when not contiguous), ``table`` [K, NCOL] float32 contiguous
    on x's device, ``step`` and ``seed`` one-element int tensors there, ``thresholds`` [B]
    float32, ``index_offset`` the global index of x's first element, ``index_run`` None or
    (length, stride): x's elements are runs of that many global indices, stride apart (a slice of
    a larger tensor; philox.check_index_run), ``n_rows`` = K (the kernel clamps the row index
    into [0, K)), ``used`` the columns non-zero in some row (None: all; the kernel skips the load
    and multiply of c_m when unused), ``history`` up to MAX_HISTORY tensors, ``guidance_cond`` c of
    x's shape with ``guidance_scale`` w (one float32 element on the device) and ``guidance_factor``
    f [B] float32 or None. Writes ``out`` (may be x) and the optional outputs."""
    shape = tuple(x.shape)
    n = x.numel()
    if n == 0:
        return out
    hist = tuple(history) + (None,) * (MAX_HISTORY - len(history))
    tensors = (x, model_output, aux, noise) + hist + (out, x0_out, eps_out, xc_out, model_in_out, guidance_cond)
    n_in, n_out = 4 + MAX_HISTORY, 5  # guidance_cond, an input, comes last (TENSORS order)
    strided = False
    for t in tensors:  # a plain loop: a generator costs ~2 us a call here
        if t is not None and not t.is_contiguous():
            strided = True
            break
    if strided and seed is None and _dense_same_layout(tensors, shape, n):
        # e.g. everything channels_last: an elementwise update may walk memory in storage order,
        # without the per-element index arithmetic (64-bit div/mod) of the strided path. Not
        # with in-kernel noise, which is keyed by the logical row-major index.
        strided = False
    if strided and len(shape) > 4:
        # More than 4 dimensions and not contiguous: run on contiguous copies.
        ins = [t.contiguous() if t is not None else None for t in tensors[:n_in]]
        outs = [t if t is None or t.is_contiguous() else torch.empty_like(ins[0]) for t in tensors[n_in:n_in + n_out]]
        launch(ins[0], ins[1], table, step, options, n_rows=n_rows, used=used, thresholds=thresholds, noise=ins[3],
               seed=seed, index_offset=index_offset, index_run=index_run, aux=ins[2],
               history=tuple(t for t in ins[4:n_in] if t is not None),
               out=outs[0], x0_out=outs[1], eps_out=outs[2], xc_out=outs[3], model_in_out=outs[4],
               guidance_cond=guidance_cond.contiguous() if guidance_cond is not None else None,
               guidance_scale=guidance_scale, guidance_factor=guidance_factor)
        for final, tmp in zip(tensors[n_in:n_in + n_out], outs):
            if final is not None and final is not tmp:
                final.copy_(tmp)
        return out
    layout = _layout_tensor(shape, tensors, x.device) if strided else step  # never read when dense
    run = index_run is not None and seed is not None
    shift = 0 if run else index_offset % 4  # per-element indices need no alignment to Philox groups
    block, warps = _launch_config(n)
    per_sample = n // shape[0] if len(shape) > 0 and shape[0] > 0 else max(n, 1)
    dummy = x  # never dereferenced: the flags keep the kernel from touching it
    grid = (-(-(n + shift) // block),)  # plain ints: triton.cdiv is a jit function, ~4 us a call
    _fused_step_kernel[grid](
        *[t if t is not None else dummy for t in tensors],
        thresholds if thresholds is not None else dummy, table, step, seed if seed is not None else step, layout,
        *(t if t is not None else dummy for t in (guidance_scale, guidance_factor)),
        n, index_offset - shift, per_sample, float(options.clip_range or 1.0), float(options.cov_max), n_rows,
        index_run[0] if run else 1, index_run[1] if run else 1,
        PRED=PREDICTION_CODES[options.prediction_type], CLIP=options.clip_range is not None,
        THRESH=thresholds is not None, RECOMPUTE_EPS=options.recompute_eps,
        NOISE=1 if noise is not None else (3 if run else 2) if seed is not None else 0,
        VAR_MODE=VAR_MODES[options.var_mode], RAW_M=used is None or "c_m" in used, N_HIST=len(history),
        WRITE_X0=x0_out is not None, WRITE_EPS=eps_out is not None, WRITE_XC=xc_out is not None,
        WRITE_IN=model_in_out is not None,
        STRIDED=(2 if _fits_int32(tensors, n + block) else 1) if strided else 0,
        BLOCK=block, SHIFT=shift, GUIDE=0 if guidance_cond is None else 1 if guidance_factor is None else 2,
        num_warps=warps,
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


def reference(x, model_output, table, step, options, *, used=None, thresholds=None, noise=None, seed=None,
              index_offset=0, index_run=None, aux=None, history=(), need_x0=True, need_eps=False, need_xc=False,
              need_model_in=False, guidance_cond=None, guidance_scale=None, guidance_factor=None):
    """Plain-torch version of the kernel, in float32 (float64 if the table is float64).
    ``used``: the names of the columns that are non-zero in some row (None: all); the terms of
    the others are skipped (a flow Euler step is then x_t + c_m m, two passes instead of eight).
    Returns (x_s, x0_hat or None, model_in or None, extra) in x's dtype, ``extra`` holding "eps"
    (eps_hat) with ``need_eps`` and "xc" (the corrected sample x_c) with ``need_xc``. With ``guidance_cond``
    the model output is u + w (c - u) (times ``guidance_factor`` [B] when given), as in the kernel. No host
    sync: the step row is gathered on the device and every coefficient stays a 0-d tensor."""
    cdt = torch.float64 if table.dtype == torch.float64 else torch.float32
    # One gather and one unbind: indexing a tensor costs ~3 us a column, a tuple nothing.
    row = table.to(cdt).index_select(0, step.reshape(1).long()).reshape(NCOL).unbind(0)
    a_t, b_t, c_x0, c_eps, c_xt, std = (row[COL[k]] for k in ("a_t", "b_t", "c_x0", "c_eps", "c_xt", "std"))
    xf, m = x.to(cdt), model_output.to(cdt)
    if guidance_cond is not None:  # before anything reads m, in the kernel's order
        m = m + guidance_scale.to(cdt).reshape(()) * (guidance_cond.to(cdt) - m)
        if guidance_factor is not None:
            m = m * guidance_factor.to(cdt).reshape((-1,) + (1,) * (x.dim() - 1))

    def on(name):  # a column that is 0 in every row of the table adds nothing: skip its pass
        return used is None or name in used

    x0 = eps = None
    if on("c_x0") or on("c_eps") or need_x0 or need_eps or need_xc:
        # The kernel's arithmetic in the kernel's order (x0_hat first, then the combination).
        x0, eps = x0_eps(xf, m, a_t, b_t, options.prediction_type)
        if thresholds is not None:
            s = thresholds.to(cdt).reshape((-1,) + (1,) * (x.dim() - 1))
            x0 = torch.minimum(torch.maximum(x0, -s), s).div_(s)
        elif options.clip_range is not None:
            x0 = x0.clamp(-options.clip_range, options.clip_range)
        if options.recompute_eps:
            eps = torch.addcmul(xf, x0, -a_t).div_(b_t)
    x_s = c_x0 * x0 if on("c_x0") else None
    if on("c_eps"):
        x_s = eps * c_eps if x_s is None else x_s.addcmul_(eps, c_eps)
    if on("c_xt"):
        x_s = xf * c_xt if x_s is None else x_s.addcmul_(xf, c_xt)
    if on("c_m"):
        # The product rounded first, then added: x_t + (sigma_s - sigma_t) u exactly as diffusers
        # writes the flow Euler step, so that the two agree bit for bit in float32.
        x_s = m * row[COL["c_m"]] if x_s is None else x_s.add_(m * row[COL["c_m"]])
    if x_s is None:
        x_s = torch.zeros_like(xf)
    hs = [h.to(cdt) for h in history]
    for h, col in zip(hs, HISTORY_COLUMNS):
        x_s = x_s.addcmul_(h, row[COL[col]])
    extra = {}
    # x0_hat (sample prediction) or eps_hat (epsilon) may be the model output tensor itself: step()
    # copies the outputs after one another, and one of them may be the model output (in place).
    if need_x0 and x0 is model_output:
        x0 = x0.clone()
    if need_eps and eps is model_output:
        eps = eps.clone()
    if need_xc:
        x_c = xf * row[COL["xc_xt"]]
        x_c = x_c.addcmul_(x0, row[COL["xc_x0"]]).addcmul_(eps, row[COL["xc_eps"]])
        for h, col in zip(hs, XC_COLUMNS[3:]):
            x_c = x_c.addcmul_(h, row[COL[col]])
        extra["xc"] = x_c.to(x.dtype)
    if need_eps:
        extra["eps"] = eps.to(x.dtype)
    if noise is not None or seed is not None:
        if noise is not None:
            z = noise.to(cdt)
        elif index_run is not None:
            z = philox.normals_run(seed.reshape(()), index_offset, x.numel(), index_run, step.reshape(()).long(),
                                   STREAM_STEP, x.device).view(x.shape).to(cdt)
        else:
            z = philox.normals_range(seed.reshape(()), index_offset, x.numel(), step.reshape(()).long(),
                                     STREAM_STEP, x.device).view(x.shape).to(cdt)
        if options.var_mode == "table":
            x_s = x_s.addcmul_(z, std)
        else:
            a = aux.to(cdt)
            noise_on = row[COL["noise"]]
            if options.var_mode == "ocm":
                sigma0 = (row[COL["cov_scale"]] * (1.0 + a)).clamp(0.0, options.cov_max)
                var = torch.minimum(std * std + row[COL["c_cov"]] ** 2 * sigma0, row[COL["var_max"]])
                noise_std = var.sqrt()
            elif options.var_mode == "learned_range":
                frac = (a + 1.0) * 0.5
                noise_std = torch.exp(0.5 * (frac * row[COL["log_var_max"]] + (1.0 - frac) * row[COL["log_var_min"]]))
            else:
                noise_std = a.sqrt()
            x_s = x_s + noise_on * noise_std * z
    model_in = (x_s * row[COL["c_in"]]).to(x.dtype) if need_model_in else None
    return x_s.to(x.dtype), (x0.to(x.dtype) if need_x0 else None), model_in, extra

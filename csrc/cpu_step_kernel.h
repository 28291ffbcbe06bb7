// The CPU step's loops. Deliberately without an include guard: cpu_step.cpp includes this file
// once per instruction set (baseline, and on x86-64 AVX2 and AVX-512 under `#pragma GCC target`),
// each time inside its own namespace, and picks one at run time. The types (View, StepParams,
// Scratch) and the always-inlined helpers (dtype conversions, philox.h) are defined by the
// includer; only loops live here, so that each copy is vectorised for its instruction set.
// FASTDIFF_KERNEL_WORDS names the Philox word generator of that instruction set;
// FASTDIFF_KERNEL_F16C / FASTDIFF_KERNEL_AVX512 say which conversion instructions it may use.
//
// A chunk of kChunk logical elements is processed at a time: each input is converted to float32
// in an L1-resident buffer (or read in place when it is dense float32), the update runs as a few
// simple loops over those buffers, and the results are rounded once into the outputs. Every input
// element is read once from memory and every output element written once (invariant 4 of docs/design.md).

#include "cpu_step_types.h"  // included once already, before the first copy: a no-op here

// --- loads and stores: logical elements [lo, lo + len) of a view <-> float32 ---------------------

// Dense float16 <-> float32 with the F16C instructions where this copy has them (the branch-free
// software conversion costs ~2x at 262K float16 elements); the same values, round-to-nearest-even.
inline int64_t half_to_float_simd(const Half* __restrict p, int64_t len, float* __restrict buf) {
  int64_t i = 0;
#if defined(FASTDIFF_KERNEL_AVX512)
  for (; i + 16 <= len; i += 16)
    _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))));
#endif
#if defined(FASTDIFF_KERNEL_F16C)
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
  return i;
}

inline int64_t float_to_half_simd(const float* __restrict buf, int64_t len, Half* __restrict p) {
  int64_t i = 0;
#if defined(FASTDIFF_KERNEL_AVX512)
  for (; i + 16 <= len; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(FASTDIFF_KERNEL_F16C)
  for (; i + 8 <= len; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  return i;
}

template <typename T>
void gather(const View& v, int64_t lo, int64_t len, float* __restrict buf) {
  const T* base = reinterpret_cast<const T*>(v.ptr);
  if (v.dense) {
    const T* __restrict p = base + lo;
    int64_t i = 0;
    if constexpr (std::is_same_v<T, Half>) i = half_to_float_simd(p, len, buf);
    for (; i < len; ++i) buf[i] = to_float(p[i]);
    return;
  }
  int64_t idx[kMaxDims];
  int64_t off = 0, rem = lo;
  for (int d = v.nd - 1; d >= 0; --d) {
    idx[d] = rem % v.size[d];
    rem /= v.size[d];
    off += idx[d] * v.stride[d];
  }
  const int last = v.nd - 1;
  const int64_t n_last = v.size[last], s_last = v.stride[last];
  for (int64_t k = 0; k < len;) {
    const int64_t run = std::min(len - k, n_last - idx[last]);
    const T* p = base + off;
    for (int64_t j = 0; j < run; ++j) buf[k + j] = to_float(p[j * s_last]);
    k += run;
    off += run * s_last;
    idx[last] += run;
    if (idx[last] == n_last && k < len) {
      off -= n_last * s_last;
      idx[last] = 0;
      for (int d = last - 1; d >= 0; --d) {
        off += v.stride[d];
        if (++idx[d] < v.size[d]) break;
        off -= v.size[d] * v.stride[d];
        idx[d] = 0;
      }
    }
  }
}

template <typename T>
void scatter(const View& v, int64_t lo, int64_t len, const float* __restrict buf) {
  T* base = reinterpret_cast<T*>(v.ptr);
  if (v.dense) {
    T* __restrict p = base + lo;
    int64_t i = 0;
    if constexpr (std::is_same_v<T, Half>) i = float_to_half_simd(buf, len, p);
    for (; i < len; ++i) p[i] = from_float<T>(buf[i]);
    return;
  }
  int64_t idx[kMaxDims];
  int64_t off = 0, rem = lo;
  for (int d = v.nd - 1; d >= 0; --d) {
    idx[d] = rem % v.size[d];
    rem /= v.size[d];
    off += idx[d] * v.stride[d];
  }
  const int last = v.nd - 1;
  const int64_t n_last = v.size[last], s_last = v.stride[last];
  for (int64_t k = 0; k < len;) {
    const int64_t run = std::min(len - k, n_last - idx[last]);
    T* p = base + off;
    for (int64_t j = 0; j < run; ++j) p[j * s_last] = from_float<T>(buf[k + j]);
    k += run;
    off += run * s_last;
    idx[last] += run;
    if (idx[last] == n_last && k < len) {
      off -= n_last * s_last;
      idx[last] = 0;
      for (int d = last - 1; d >= 0; --d) {
        off += v.stride[d];
        if (++idx[d] < v.size[d]) break;
        off -= v.size[d] * v.stride[d];
        idx[d] = 0;
      }
    }
  }
}

// A pointer to the chunk as float32: the tensor itself when dense float32, else `buf` filled.
inline const float* load(const View& v, int64_t lo, int64_t len, float* buf) {
  switch (v.dtype) {
    case kF32:
      if (v.dense) return reinterpret_cast<const float*>(v.ptr) + lo;
      gather<float>(v, lo, len, buf);
      return buf;
    case kF16:
      gather<Half>(v, lo, len, buf);
      return buf;
    default:
      gather<BFloat16>(v, lo, len, buf);
      return buf;
  }
}

inline void store(const View& v, int64_t lo, int64_t len, const float* buf) {
  switch (v.dtype) {
    case kF32:
      scatter<float>(v, lo, len, buf);
      return;
    case kF16:
      scatter<Half>(v, lo, len, buf);
      return;
    default:
      scatter<BFloat16>(v, lo, len, buf);
      return;
  }
}

// --- noise -----------------------------------------------------------------------------------------

// Normals for the global indices g .. g + len - 1 (len <= kChunk) with the given keys and counters.
inline const float* normals_at(const philox::Keys& keys, uint32_t step_counter, uint32_t stream, int64_t g,
                               int64_t len, Scratch& s) {
  const uint64_t q0 = static_cast<uint64_t>(g) >> 2;
  const uint64_t q1 = static_cast<uint64_t>(g + len - 1) >> 2;
  philox::normals_groups(FASTDIFF_KERNEL_WORDS, keys, q0, static_cast<int64_t>(q1 - q0 + 1), step_counter, stream,
                         s.words, s.z);
  return s.z + (g & 3);
}

// Normals for the logical elements lo .. lo + len - 1 of a tensor whose element l has global index
// base + (l / run_len) * run_stride + l % run_len (a shard): one draw per run segment, gathered
// into s.zr. run_len 0: the contiguous range base + lo .. (no copy).
inline const float* normals_logical(const philox::Keys& keys, uint32_t step_counter, uint32_t stream, int64_t base,
                                    int64_t run_len, int64_t run_stride, int64_t lo, int64_t len, Scratch& s) {
  if (run_len == 0) return normals_at(keys, step_counter, stream, base + lo, len, s);
  for (int64_t k = 0; k < len;) {
    const int64_t l = lo + k, off = l % run_len;
    const int64_t seg = std::min(run_len - off, len - k);
    const float* z = normals_at(keys, step_counter, stream, base + (l / run_len) * run_stride + off, seg, s);
    std::memcpy(s.zr + k, z, static_cast<size_t>(seg) * sizeof(float));
    k += seg;
  }
  return s.zr;
}

void randn_range(const RandnParams& p, int64_t lo, int64_t hi) {
  Scratch& s = scratch();
  for (int64_t c = lo; c < hi; c += kChunk) {
    const int64_t len = std::min(kChunk, hi - c);
    store(p.out, c, len,
          normals_logical(p.keys, p.step_counter, p.stream, p.index_offset, p.run_len, p.run_stride, c, len, s));
  }
}

// --- the step ---------------------------------------------------------------------------------------

// x0_hat, eps_hat and c_x0 x0_hat + c_eps eps_hat + c_xt x_t in one loop, for steps without clip,
// thresholds or recomputed eps (most): one pass over L1 instead of two (float32, one thread:
// 183 -> 125 us at 1M elements, 51 -> 42 us at 256K).
template <int PRED, bool WRITE_X0>
void predict_combine(const float* __restrict X, const float* __restrict M, const Coef& c, float* __restrict X0,
                     float* __restrict XS, int64_t len) {
  const float a = c.a_t, b = c.b_t, c_x0 = c.c_x0, c_eps = c.c_eps, c_xt = c.c_xt;
  for (int64_t i = 0; i < len; ++i) {
    const float x = X[i], m = M[i];
    float x0, eps;
    if (PRED == kEpsilon) {
      x0 = (x - b * m) / a;
      eps = m;
    } else if (PRED == kVPrediction) {
      x0 = a * x - b * m;
      eps = a * m + b * x;
    } else if (PRED == kSample) {
      x0 = m;
      eps = (x - a * m) / b;
    } else {
      x0 = x - b * m;
      eps = x + a * m;
    }
    if (WRITE_X0) X0[i] = x0;
    XS[i] = c_x0 * x0 + c_eps * eps + c_xt * x;
  }
}

template <bool WRITE_X0>
inline void predict_combine_all(int prediction, const float* X, const float* M, const Coef& c, float* X0, float* XS,
                                int64_t len) {
  switch (prediction) {
    case kEpsilon: predict_combine<kEpsilon, WRITE_X0>(X, M, c, X0, XS, len); break;
    case kVPrediction: predict_combine<kVPrediction, WRITE_X0>(X, M, c, X0, XS, len); break;
    case kSample: predict_combine<kSample, WRITE_X0>(X, M, c, X0, XS, len); break;
    default: predict_combine<kFlow, WRITE_X0>(X, M, c, X0, XS, len); break;
  }
}

// The same with clip / thresholds / recomputed eps: a loop per stage (x0_hat, clamp, eps, sum).
inline void predict_clip_combine(const StepParams& p, int64_t lo, int64_t len, const float* __restrict X,
                                 const float* __restrict M, Scratch& s) {
  const Coef& c = p.coef;
  float* __restrict X0 = s.x0;
  float* __restrict EB = s.eps;
  const float* E = M;  // eps_hat: the model output itself for epsilon prediction
  const float a_t = c.a_t, b_t = c.b_t;
  switch (p.prediction) {
    case kEpsilon:
      for (int64_t i = 0; i < len; ++i) X0[i] = (X[i] - b_t * M[i]) / a_t;
      break;
    case kVPrediction:
      for (int64_t i = 0; i < len; ++i) {
        X0[i] = a_t * X[i] - b_t * M[i];
        EB[i] = a_t * M[i] + b_t * X[i];
      }
      E = EB;
      break;
    case kSample:
      for (int64_t i = 0; i < len; ++i) {
        X0[i] = M[i];
        EB[i] = (X[i] - a_t * M[i]) / b_t;
      }
      E = EB;
      break;
    default:  // kFlow: u = eps - x0 on x_t = a x0 + b eps, a + b = 1
      for (int64_t i = 0; i < len; ++i) {
        X0[i] = X[i] - b_t * M[i];
        EB[i] = X[i] + a_t * M[i];
      }
      E = EB;
      break;
  }

  // Clamps keep a NaN (x < lo is false for NaN), as torch.clamp and the kernel's propagate_nan do.
  if (p.thresholds != nullptr) {
    for (int64_t i = 0; i < len;) {
      const int64_t b = (lo + i) / p.per_sample;
      const int64_t end = std::min(len, (b + 1) * p.per_sample - lo);
      const float sb = p.thresholds[b * p.thresholds_stride], neg = -sb;
      for (int64_t j = i; j < end; ++j) {
        float v = X0[j];
        v = v < neg ? neg : v;
        v = v > sb ? sb : v;
        X0[j] = v / sb;
      }
      i = end;
    }
  } else if (p.clip) {
    const float r = p.clip_range, neg = -p.clip_range;
    for (int64_t i = 0; i < len; ++i) {
      float v = X0[i];
      v = v < neg ? neg : v;
      X0[i] = v > r ? r : v;
    }
  }
  if (p.recompute_eps) {
    for (int64_t i = 0; i < len; ++i) EB[i] = (X[i] - a_t * X0[i]) / b_t;
    E = EB;
  }

  float* __restrict XS = s.xs;
  {
    const float c_x0 = c.c_x0, c_eps = c.c_eps, c_xt = c.c_xt;
    const float* __restrict EE = E;
    for (int64_t i = 0; i < len; ++i) XS[i] = c_x0 * X0[i] + c_eps * EE[i] + c_xt * X[i];
  }
}

// eps_hat of a chunk (eps_out, or x_c's eps term) when the fused loop above did not keep it.
inline const float* eps_of(const StepParams& p, const float* __restrict X, const float* __restrict M,
                           const float* __restrict X0, float* __restrict EB, int64_t len) {
  const Coef& c = p.coef;
  const float a_t = c.a_t, b_t = c.b_t;
  if (p.recompute_eps) {
    for (int64_t i = 0; i < len; ++i) EB[i] = (X[i] - a_t * X0[i]) / b_t;
    return EB;
  }
  switch (p.prediction) {
    case kEpsilon: return M;
    case kVPrediction:
      for (int64_t i = 0; i < len; ++i) EB[i] = a_t * M[i] + b_t * X[i];
      break;
    case kSample:
      for (int64_t i = 0; i < len; ++i) EB[i] = (X[i] - a_t * M[i]) / b_t;
      break;
    default:
      for (int64_t i = 0; i < len; ++i) EB[i] = X[i] + a_t * M[i];
      break;
  }
  return EB;
}

// Classifier-free guidance: G = U + w (C - U), then times the per-sample factor f_b (guidance
// rescale), in the kernel's order. G is s.m, which U may be (gathered there): element i is read
// before it is written, so U and G carry no __restrict.
inline const float* guide(const StepParams& p, int64_t lo, int64_t len, const float* U, const float* __restrict C,
                          float* G) {
  const float w = p.guidance_scale;
  for (int64_t i = 0; i < len; ++i) G[i] = U[i] + w * (C[i] - U[i]);
  if (p.guidance_factor != nullptr) {
    for (int64_t i = 0; i < len;) {
      const int64_t b = (lo + i) / p.per_sample;
      const int64_t end = std::min(len, (b + 1) * p.per_sample - lo);
      const float f = p.guidance_factor[b * p.guidance_factor_stride];
      for (int64_t j = i; j < end; ++j) G[j] = G[j] * f;
      i = end;
    }
  }
  return G;
}

inline void step_chunk(const StepParams& p, int64_t lo, int64_t len, Scratch& s) {
  const Coef& c = p.coef;
  const float* __restrict X = load(p.x, lo, len, s.x);
  const float* __restrict M =
      p.g ? guide(p, lo, len, load(p.m, lo, len, s.m), load(p.g, lo, len, s.g), s.m) : load(p.m, lo, len, s.m);
  float* __restrict X0 = s.x0;
  float* __restrict XS = s.xs;
  // x0_hat is needed in the buffer when written out or used by x_c; eps_hat (recomputed: the
  // fused loop does not keep it) when written out or used by x_c.
  const bool need_x0 = p.x0 || p.xc || p.eps;
  if (p.thresholds == nullptr && !p.clip && !p.recompute_eps) {
    if (need_x0)
      predict_combine_all<true>(p.prediction, X, M, p.coef, X0, XS, len);
    else
      predict_combine_all<false>(p.prediction, X, M, p.coef, X0, XS, len);
  } else {
    predict_clip_combine(p, lo, len, X, M, s);
  }
  const float* E = (p.eps || p.xc) ? eps_of(p, X, M, X0, s.eps, len) : nullptr;
  if (p.eps && E == M && M != s.m) {
    // eps_hat is the model output itself, read in place: keep a copy, since an output may be the
    // model output (in place) and is stored before eps_out.
    std::memcpy(s.eps, M, static_cast<size_t>(len) * sizeof(float));
    E = s.eps;
  }
  if (c.c_m != 0.0f) {  // the raw model-output term (flow Euler: x_t + (sigma_s - sigma_t) u), product then sum
    const float cm = c.c_m;
    for (int64_t i = 0; i < len; ++i) XS[i] = XS[i] + cm * M[i];
  }
  float* __restrict XC = s.xc;
  if (p.xc) {
    const float kx = c.xc_xt, k0 = c.xc_x0, ke = c.xc_eps;
    const float* __restrict EE = E;
    for (int64_t i = 0; i < len; ++i) XC[i] = kx * X[i] + k0 * X0[i] + ke * EE[i];
  }
  for (int k = 0; k < p.n_hist; ++k) {
    const float* __restrict H = load(p.h[k], lo, len, s.h);
    const float ch = c.c_h[k];
    for (int64_t i = 0; i < len; ++i) XS[i] = XS[i] + ch * H[i];
    if (p.xc) {
      const float kh = c.xc_h[k];
      for (int64_t i = 0; i < len; ++i) XC[i] = XC[i] + kh * H[i];
    }
  }

  if (p.noise_mode != kNoiseNone) {
    const float* __restrict Z =
        p.noise_mode == kNoiseTensor
            ? load(p.z, lo, len, s.z)
            : normals_logical(p.keys, p.step_counter, p.stream, p.index_offset, p.run_len, p.run_stride, lo, len, s);
    if (p.var_mode == kVarTable) {
      const float sd = c.std;
      for (int64_t i = 0; i < len; ++i) XS[i] = XS[i] + sd * Z[i];
    } else {
      const float* __restrict A = load(p.aux, lo, len, s.aux);
      const float on = c.noise;
      if (p.var_mode == kVarOcm) {
        // Sigma0 = clamp(cov_scale (1 + h), 0, cov_max); Var = min(std^2 + c_cov^2 Sigma0, var_max)
        const float std2 = c.std * c.std, cov2 = c.c_cov * c.c_cov, scale = c.cov_scale;
        const float cov_max = p.cov_max, var_max = c.var_max;
        for (int64_t i = 0; i < len; ++i) {
          float sigma0 = scale * (1.0f + A[i]);
          sigma0 = sigma0 < 0.0f ? 0.0f : sigma0;
          sigma0 = sigma0 > cov_max ? cov_max : sigma0;
          float var = std2 + cov2 * sigma0;
          var = var > var_max ? var_max : var;
          XS[i] = XS[i] + on * std::sqrt(var) * Z[i];
        }
      } else if (p.var_mode == kVarLearnedRange) {
        // log-variance interpolated between the table's bounds; expf is a libm call (no SIMD):
        // learned_range models are rare and this mode is not on a benchmark's path.
        const float vlo = c.log_var_min, vhi = c.log_var_max;
        for (int64_t i = 0; i < len; ++i) {
          const float frac = (A[i] + 1.0f) * 0.5f;
          XS[i] = XS[i] + on * std::exp(0.5f * (frac * vhi + (1.0f - frac) * vlo)) * Z[i];
        }
      } else {  // kVarLearned: the model outputs the variance
        for (int64_t i = 0; i < len; ++i) XS[i] = XS[i] + on * std::sqrt(A[i]) * Z[i];
      }
    }
  }

  store(p.out, lo, len, XS);
  if (p.x0) store(p.x0, lo, len, X0);
  if (p.eps) store(p.eps, lo, len, E);
  if (p.xc) store(p.xc, lo, len, XC);
  if (p.model_in) {
    // From the float32 x_s, before its rounding into out (s.eps is free: eps_hat is stored).
    float* __restrict MI = s.eps;
    const float c_in = c.c_in;
    for (int64_t i = 0; i < len; ++i) MI[i] = c_in * XS[i];
    store(p.model_in, lo, len, MI);
  }
}

void step_range(const StepParams& p, int64_t lo, int64_t hi) {
  Scratch& s = scratch();
  for (int64_t c = lo; c < hi; c += kChunk) step_chunk(p, c, std::min(kChunk, hi - c), s);
}

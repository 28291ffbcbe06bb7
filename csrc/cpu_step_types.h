// The types and helpers every instruction-set copy of the CPU step's loops shares (the dtype codes,
// the float16 / bfloat16 conversions, a tensor's view, a table row, the step's parameters, the
// per-thread scratch buffers): csrc/cpu_step.cpp and csrc/cpu_step_kernel.h both include this.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "columns.h"
#include "common.h"
#include "philox.h"

namespace fastdiff {
namespace cpu {

// --- types shared by every instruction-set copy of the loops ---------------------------------------

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5 };
enum Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2, kFlow = 3 };
enum VarMode : int { kVarTable = 0, kVarOcm = 1, kVarLearnedRange = 2, kVarLearned = 3 };
enum NoiseMode : int { kNoiseNone = 0, kNoiseTensor = 1, kNoisePhilox = 2 };

constexpr int kMaxDims = 16;
// Elements per chunk: ten float32 buffers of 512 (20 KiB) stay in a 32 KiB L1. 256 and 1024 were
// within 5% of 512 at 16K..16M elements; 512 is the fastest of the three for the noised step.
constexpr int64_t kChunk = 512;

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// fp16 <-> fp32 without F16C, branch-free so that the loops vectorise (the FP16 library's
// fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value, which c10::Half uses): exact, and
// round-to-nearest-even on the way down, with overflow to inf and NaN kept NaN.
FASTDIFF_INLINE float to_float(float v) { return v; }
FASTDIFF_INLINE float to_float(Half h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = philox::u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = philox::u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  return philox::u2f(sign | (two_w < (1u << 27) ? philox::f2u(denormalized) : philox::f2u(normalized)));
}
FASTDIFF_INLINE float to_float(BFloat16 b) { return philox::u2f(static_cast<uint32_t>(b.bits) << 16); }

template <typename T>
FASTDIFF_INLINE T from_float(float f);
template <>
FASTDIFF_INLINE float from_float<float>(float f) {
  return f;
}
template <>
FASTDIFF_INLINE Half from_float<Half>(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = philox::f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = philox::u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = philox::f2u(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}
template <>
FASTDIFF_INLINE BFloat16 from_float<BFloat16>(float f) {
  // c10::BFloat16's round_to_nearest_even: add 0x7FFF plus the lowest kept bit, truncate; NaN -> 0x7FC0
  const uint32_t u = philox::f2u(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BFloat16{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded)};
}

struct View {  // a tensor's logical elements, dims coalesced (row-major order kept)
  char* ptr = nullptr;
  int dtype = kF32;
  bool dense = false;  // logical element i at ptr + i * itemsize
  int nd = 1;
  int64_t size[kMaxDims] = {1};
  int64_t stride[kMaxDims] = {1};
  explicit operator bool() const { return ptr != nullptr; }
};

constexpr int kMaxHistory = kHistorySlots;  // history tensors H0..H3 (csrc/columns.h)

struct Coef {  // one table row, in float32 (the kernel's precision)
  float a_t, b_t, c_x0, c_eps, c_xt, c_m, std, c_cov, cov_scale, log_var_min, log_var_max, var_max, noise, c_in;
  float c_h[kMaxHistory];
  float xc_xt, xc_x0, xc_eps;  // the corrected sample x_c (UniPC's corrector)
  float xc_h[kMaxHistory];
};

struct StepParams {
  int64_t n = 0, per_sample = 1, index_offset = 0;
  // A shard of a larger tensor: logical element l has global index
  // index_offset + (l / run_len) * run_stride + l % run_len (run_len 0: index_offset + l).
  int64_t run_len = 0, run_stride = 0;
  View x, m, aux, z, out, x0, eps, xc, model_in;
  View h[kMaxHistory];
  // Classifier-free guidance: m is u (the view above) + guidance_scale (c - u), c the view `g`,
  // times guidance_factor[b * guidance_factor_stride] per sample b when that is given.
  View g;
  float guidance_scale = 0.0f;
  const float* guidance_factor = nullptr;
  int64_t guidance_factor_stride = 1;
  int n_hist = 0;
  Coef coef{};
  int prediction = kEpsilon, var_mode = kVarTable, noise_mode = kNoiseNone;
  bool clip = false, recompute_eps = false;
  float clip_range = 1.0f, cov_max = 1.0f;
  const float* thresholds = nullptr;
  int64_t thresholds_stride = 1;
  philox::Keys keys{0};
  uint32_t step_counter = 0, stream = philox::kStreamStep;
};

struct RandnParams {
  View out;
  int64_t index_offset = 0, run_len = 0, run_stride = 0;  // as StepParams
  philox::Keys keys{0};
  uint32_t step_counter = 0, stream = philox::kStreamInit;
};

struct alignas(64) Scratch {
  float x[kChunk], m[kChunk], aux[kChunk], h[kChunk], x0[kChunk], eps[kChunk], xs[kChunk], xc[kChunk];
  float g[kChunk];  // the conditional model output (guidance)
  float z[kChunk + 8];
  float zr[kChunk];  // a shard's normals, gathered from its runs
  uint32_t words[kChunk + 8];
};

inline Scratch& scratch() {
  thread_local std::unique_ptr<Scratch> s(new Scratch);
  return *s;
}

}  // namespace cpu
}  // namespace fastdiff

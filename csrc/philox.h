// Counter-based Gaussian noise for the CPU step: Philox-4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011) and the Box-Muller transform of fastdiff/kernels/philox.py.
//
// Element g of the noise at step k is word g % 4 of philox(key = seed, counter = (g / 4 low,
// g / 4 high, k, stream)), so it depends on (seed, global index, step, stream) only: the same
// 32-bit words as the Triton kernel and the torch implementation, whatever the block size,
// thread count or batch split. Words become uniforms ((w >> 9) + 0.5) * 2^-23 (exact in float32,
// never 0 or 1) and two Box-Muller pairs per call: n0, n1 = r01 (cos, sin)(2 pi u1),
// n2, n3 = r23 (cos, sin)(2 pi u3), r = sqrt(-2 log u).
//
// log / sin / cos are written here as branch-free float32 polynomials (Cephes' minimax
// coefficients) so that the loops over a block vectorise: glibc's scalar logf + sincosf would cost
// ~3 ns per element, more than torch.randn. Their error on the 2^23 possible uniforms is measured
// exhaustively by tests/test_cpu_step.py (about 1 float32 ulp each, like torch's own).
//
// Everything is FASTDIFF_INLINE (always inlined): cpu_step.cpp compiles its loops once per
// instruction set, and an always-inlined helper takes the instruction set of its caller.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define FASTDIFF_INLINE inline __attribute__((always_inline))
#else
#define FASTDIFF_INLINE inline
#endif

namespace fastdiff {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;    // Weyl key increments
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;  // round multipliers
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;
constexpr uint32_t kStreamStep = 0;  // philox.STREAM_STEP: noise injected by a step
constexpr uint32_t kStreamInit = 1;  // philox.STREAM_INIT: the initial x_T

FASTDIFF_INLINE uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
FASTDIFF_INLINE float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The 40 round keys of one seed: k0 + r * kKeyA, k1 + r * kKeyB (uint32 wrap-around).
struct Keys {
  uint32_t k0[kRounds], k1[kRounds];
  explicit Keys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kRounds; ++r, a += kKeyA, b += kKeyB) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

// Philox-4x32-10 in place on one counter block (c0, c1, c2, c3).
FASTDIFF_INLINE void philox4x32_10(const Keys& k, uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kRoundA) * c0;
    const uint64_t p2 = static_cast<uint64_t>(kRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k.k0[r];
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k.k1[r];
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
  }
}

// 23 random bits + 0.5, times 2^-23: exact in float32, strictly inside (0, 1).
FASTDIFF_INLINE float uniform(uint32_t w) {
  return (static_cast<float>(static_cast<int32_t>(w >> 9)) + 0.5f) * 1.1920928955078125e-07f;
}

// Natural log of a positive normal float (the uniforms above): u = m 2^e with m in [sqrt(1/2),
// sqrt(2)), log u = e ln 2 + log1p(m - 1), log1p by Cephes' logf polynomial; m - 1 is exact.
FASTDIFF_INLINE float log_positive(float u) {
  const uint32_t bits = f2u(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;  // u = m 2^e, m in [0.5, 1)
  const float m = u2f((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool below = m < 0.707106781186547524f;
  e -= below ? 1 : 0;
  const float x = below ? (m + m) - 1.0f : m - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;  // ln 2 = 0.693359375 - 2.12194440e-4 (+ ~3e-12): e ln 2 in two parts
  y += -0.5f * z;
  return (x + y) + 0.693359375f * fe;
}

// sin and cos of th in [0, 2 pi]: quadrant k = round(th / (pi/2)), r = th - k pi/2 in three parts
// (Cody-Waite; k <= 4 keeps k * part exact), Cephes' sinf / cosf polynomials on [-pi/4, pi/4].
FASTDIFF_INLINE void sincos_0_2pi(float th, float& s, float& c) {
  const int32_t k = static_cast<int32_t>(th * 0.636619772367581343f + 0.5f);
  const float fk = static_cast<float>(k);
  float r = th - fk * 1.5703125f;
  r = r - fk * 4.837512969970703125e-4f;
  r = r - fk * 7.54978995489188216e-8f;
  const float z = r * r;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  const float sr = ps * z * r + r;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  const float cr = pc * z * z - 0.5f * z + 1.0f;
  // quadrant q: (sin, cos) = (sr, cr), (cr, -sr), (-sr, -cr), (-cr, sr)
  const bool swap = (k & 1) != 0;
  const uint32_t sin_sign = static_cast<uint32_t>(k & 2) << 30;
  const uint32_t cos_sign = static_cast<uint32_t>((k + 1) & 2) << 30;
  s = u2f(f2u(swap ? cr : sr) ^ sin_sign);
  c = u2f(f2u(swap ? sr : cr) ^ cos_sign);
}

// The four normals of one Philox call (lanes 0..3 of the group), as normal_block computes them.
FASTDIFF_INLINE void box_muller4(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, float* out) {
  const float r01 = __builtin_sqrtf(-2.0f * log_positive(uniform(w0)));
  const float r23 = __builtin_sqrtf(-2.0f * log_positive(uniform(w2)));
  float s01, c01, s23, c23;
  sincos_0_2pi(6.283185307179586f * uniform(w1), s01, c01);
  sincos_0_2pi(6.283185307179586f * uniform(w3), s23, c23);
  out[0] = r01 * c01;
  out[1] = r01 * s01;
  out[2] = r23 * c23;
  out[3] = r23 * s23;
}

// Normals of the nq groups q0 .. q0 + nq - 1: out[4 j + l] = lane l of group q0 + j (4 nq floats).
// words: scratch of 4 * nq uint32. Two loops (generate, transform) so that each vectorises.
FASTDIFF_INLINE void normals_groups(const Keys& keys, uint64_t q0, int64_t nq, uint32_t step, uint32_t stream,
                                    uint32_t* __restrict words, float* __restrict out) {
  const uint32_t lo = static_cast<uint32_t>(q0), hi = static_cast<uint32_t>(q0 >> 32);
  uint32_t* __restrict w0 = words;
  uint32_t* __restrict w1 = words + nq;
  uint32_t* __restrict w2 = words + 2 * nq;
  uint32_t* __restrict w3 = words + 3 * nq;
  for (int64_t j = 0; j < nq; ++j) {
    uint32_t c0 = lo + static_cast<uint32_t>(j);
    uint32_t c1 = hi + (c0 < lo ? 1u : 0u);  // carry into the high word of g / 4
    uint32_t c2 = step, c3 = stream;
    philox4x32_10(keys, c0, c1, c2, c3);
    w0[j] = c0;
    w1[j] = c1;
    w2[j] = c2;
    w3[j] = c3;
  }
  for (int64_t j = 0; j < nq; ++j) box_muller4(w0[j], w1[j], w2[j], w3[j], out + 4 * j);
}

}  // namespace philox
}  // namespace fastdiff

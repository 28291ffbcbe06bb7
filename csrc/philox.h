// Counter-based Gaussian noise for the CPU step: Philox-4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011) and the Box-Muller transform of fastdiff/engine/kernels/philox.py.
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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTDIFF_NO_DISPATCH)
#define FASTDIFF_X86_SIMD 1
// GCC 12 warns that the undefined pass-through operand of some AVX-512 intrinsics "may be used
// uninitialized" (a false positive; the warning points into the header itself).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
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
// Scalar Philox on n consecutive counters. GCC's own vectorisation of the 32x32->64 products widens
// and narrows every lane and ran slower than this scalar loop (2.6 vs 1.9 ns per element), so the
// SIMD versions below are written with intrinsics.
FASTDIFF_INLINE void philox_words(const Keys& keys, uint64_t q0, int32_t n, uint32_t step, uint32_t stream,
                                  uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2,
                                  uint32_t* __restrict w3) {
  const uint32_t lo = static_cast<uint32_t>(q0), hi = static_cast<uint32_t>(q0 >> 32);
  for (int32_t j = 0; j < n; ++j) {
    uint32_t c0 = lo + static_cast<uint32_t>(j);
    uint32_t c1 = hi + (c0 < lo ? 1u : 0u);  // carry into the high word of g / 4
    uint32_t c2 = step, c3 = stream;
    philox4x32_10(keys, c0, c1, c2, c3);
    w0[j] = c0;
    w1[j] = c1;
    w2[j] = c2;
    w3[j] = c3;
  }
}


#ifdef FASTDIFF_X86_SIMD
// philox_words on 8 (AVX2) or 16 (AVX-512) counters at a time. A 32x32->64 product of every lane:
// _mul_epu32 multiplies the even lanes, the odd ones after a 64-bit shift, and blends put the
// high and low halves back in lane order. Same words as the scalar version (tested).
__attribute__((target("avx2"))) inline void philox_words_avx2(const Keys& keys, uint64_t q0, int32_t n,
                                                                uint32_t step, uint32_t stream, uint32_t* w0,
                                                                uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const uint32_t lo = static_cast<uint32_t>(q0), hi = static_cast<uint32_t>(q0 >> 32);
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kRoundA)), mb = _mm256_set1_epi32(static_cast<int>(kRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned compare via signed
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo)), vhi = _mm256_set1_epi32(static_cast<int>(hi));
  int32_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i c0 = _mm256_add_epi32(vlo, _mm256_add_epi32(lane, _mm256_set1_epi32(j)));
    // carry: c0 < lo (unsigned) -> all ones, subtracting -1 adds 1
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(vlo, bias), _mm256_xor_si256(c0, bias));
    __m256i c1 = _mm256_sub_epi32(vhi, carry);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(step)), c3 = _mm256_set1_epi32(static_cast<int>(stream));
    for (int r = 0; r < kRounds; ++r) {
      const __m256i pa_even = _mm256_mul_epu32(c0, ma), pa_odd = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), ma);
      const __m256i pb_even = _mm256_mul_epu32(c2, mb), pb_odd = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), mb);
      const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(pa_even, 32), pa_odd, 0xAA);
      const __m256i lo_a = _mm256_blend_epi32(pa_even, _mm256_slli_epi64(pa_odd, 32), 0xAA);
      const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(pb_even, 32), pb_odd, 0xAA);
      const __m256i lo_b = _mm256_blend_epi32(pb_even, _mm256_slli_epi64(pb_odd, 32), 0xAA);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(keys.k0[r])));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(keys.k1[r])));
      c1 = lo_b;
      c3 = lo_a;
      c0 = n0;
      c2 = n2;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + j), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + j), c3);
  }
  philox_words(keys, q0 + static_cast<uint64_t>(j), n - j, step, stream, w0 + j, w1 + j, w2 + j, w3 + j);
}

__attribute__((target("avx512f"))) inline void philox_words_avx512(const Keys& keys, uint64_t q0, int32_t n,
                                                                     uint32_t step, uint32_t stream, uint32_t* w0,
                                                                     uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const uint32_t lo = static_cast<uint32_t>(q0), hi = static_cast<uint32_t>(q0 >> 32);
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kRoundA)), mb = _mm512_set1_epi32(static_cast<int>(kRoundB));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo)), vhi = _mm512_set1_epi32(static_cast<int>(hi));
  const __mmask16 odd = 0xAAAA;
  int32_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512i c0 = _mm512_add_epi32(vlo, _mm512_add_epi32(lane, _mm512_set1_epi32(j)));
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, vlo);
    __m512i c1 = _mm512_mask_add_epi32(vhi, carry, vhi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(step)), c3 = _mm512_set1_epi32(static_cast<int>(stream));
    for (int r = 0; r < kRounds; ++r) {
      const __m512i pa_even = _mm512_mul_epu32(c0, ma), pa_odd = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), ma);
      const __m512i pb_even = _mm512_mul_epu32(c2, mb), pb_odd = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), mb);
      const __m512i hi_a = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pa_even, 32), pa_odd);
      const __m512i lo_a = _mm512_mask_blend_epi32(odd, pa_even, _mm512_slli_epi64(pa_odd, 32));
      const __m512i hi_b = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pb_even, 32), pb_odd);
      const __m512i lo_b = _mm512_mask_blend_epi32(odd, pb_even, _mm512_slli_epi64(pb_odd, 32));
      // three-way xor in one instruction (truth table 0x96)
      const __m512i n0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(keys.k0[r])), 0x96);
      const __m512i n2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(keys.k1[r])), 0x96);
      c1 = lo_b;
      c3 = lo_a;
      c0 = n0;
      c2 = n2;
    }
    _mm512_storeu_si512(w0 + j, c0);
    _mm512_storeu_si512(w1 + j, c1);
    _mm512_storeu_si512(w2 + j, c2);
    _mm512_storeu_si512(w3 + j, c3);
  }
  philox_words(keys, q0 + static_cast<uint64_t>(j), n - j, step, stream, w0 + j, w1 + j, w2 + j, w3 + j);
}
#endif  // FASTDIFF_X86_SIMD

// `words_fn` is philox_words or one of its SIMD versions (same words).
template <typename WordsFn>
FASTDIFF_INLINE void normals_groups(WordsFn words_fn, const Keys& keys, uint64_t q0, int64_t nq, uint32_t step,
                                    uint32_t stream, uint32_t* __restrict words, float* __restrict out) {
  const int32_t n = static_cast<int32_t>(nq);
  uint32_t* __restrict w0 = words;
  uint32_t* __restrict w1 = words + n;
  uint32_t* __restrict w2 = words + 2 * n;
  uint32_t* __restrict w3 = words + 3 * n;
  words_fn(keys, q0, n, step, stream, w0, w1, w2, w3);
  // int64 index: with an int32 one GCC 12 does not vectorise this loop (8x slower).
  for (int64_t j = 0; j < nq; ++j) box_muller4(w0[j], w1[j], w2[j], w3[j], out + 4 * j);
}

}  // namespace philox
}  // namespace fastdiff

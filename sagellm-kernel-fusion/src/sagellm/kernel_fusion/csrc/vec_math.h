// Vector helpers shared by the kernels: float32 exp over 16 lanes (AVX-512) or 8 lanes
// (AVX2), bfloat16 <-> float32, horizontal reductions.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace sagellm {

// e^x for x <= 88: 2^(x log2 e) split into an integer power n, built in the exponent bits
// (x is clamped at -87, so n + 127 stays a normal exponent: e^-87 ~ 1.6e-38; callers that
// need exact zeros mask them), and 2^f for |f| <= 1/2 by its Taylor series to degree 7
// (relative error below 1e-7)
inline __m256 exp256(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)),
                                 _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// all-ones lanes for the first `count` (0..8) of 8
inline __m256 first_lanes8(int64_t count) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(
      count < 0 ? 0 : (count > 8 ? 8 : count))), idx));
}

}  // namespace sagellm

#endif  // __AVX2__ && __FMA__

#if defined(__AVX512F__)
#include <immintrin.h>

namespace sagellm {

// e^x: 2^(x log2 e) split into an integer power, applied by scalef (0 below -104, inf on
// overflow), and 2^f for |f| <= 1/2 by its Taylor series to degree 7 (relative error
// below 1e-7)
inline __m512 exp512(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)),
                                 _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// the lanes of the first `count` (0..16) elements
inline __mmask16 first_lanes(int64_t count) {
  if (count >= 16) return 0xFFFF;
  if (count <= 0) return 0;
  return static_cast<__mmask16>((1u << count) - 1u);
}

// 16 bfloat16 values (masked lanes read as 0) as float32
inline __m512 load_bf16(const void* p, __mmask16 m = 0xFFFF) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

#if defined(__AVX512BF16__)
// float32 -> bfloat16, rounded to nearest even (as torch rounds)
inline __m256i round_bf16(__m512 x) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  __m256i bits;
  __builtin_memcpy(&bits, &h, sizeof(bits));
  return bits;
}
inline void store_bf16(void* p, __m512 x, __mmask16 m = 0xFFFF) {
  _mm256_mask_storeu_epi16(p, m, round_bf16(x));
}
// x rounded to bfloat16 and back: the value an eager bf16 op would hand on
inline __m512 through_bf16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16(x)), 16));
}
#endif

}  // namespace sagellm

#endif  // __AVX512F__

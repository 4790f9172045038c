// Paged decode attention on the CPU: one query token per sequence attends to the keys and
// values its block table points at, read in place from the KV pool's blocks (no gather
// into a contiguous copy). Grouped-query attention: the query heads of one KV head share
// each key and value row while it is in cache.
//
// Layouts: q [B, H, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D] (any strides
// for the first two dims, the last two contiguous); block_tables int32 [B, max_blocks];
// context_lens int32 [B]; out [B, H, D] in q's dtype. Scores and sums are float32.
//
// Quantized caches: an int8 cache whose last dim is D + 2 holds per token-head row D int8
// values and then the row's float16 scale (bit-cast into the 2 trailing bytes); a row is
// read as value * scale, the scale applied once per row (to the dot product of a key, to
// the softmax weight of a value), so values are never dequantized into a copy.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "kernels.h"
#include "vec_math.h"

namespace sagellm {
namespace {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(at::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }

// the scale a row's values are multiplied by: 1 for float caches; for int8 rows the
// float16 stored after the D values
template <typename C>
inline float row_scale(const C*, int64_t) {
  return 1.f;
}
template <>
inline float row_scale<int8_t>(const int8_t* row, int64_t d) {
  at::Half h;
  std::memcpy(&h.x, row + d, sizeof(h.x));
  return static_cast<float>(h);
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = to_float(src[i]);
}

#if defined(__AVX512F__)
// 16 lanes of a row as float32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const int8_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
}
constexpr int64_t kMaxLanes = 16;  // D up to 256 stays in registers (16 x 16 floats)

// softmax of n scores in place, 16 at a time
inline void softmax_row(float* s, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < n; t += 16)
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, sagellm::first_lanes(n - t), s + t));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = sagellm::first_lanes(n - t);
    const __m512 e = _mm512_maskz_mov_ps(
        k, sagellm::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), m)));
    _mm512_mask_storeu_ps(s + t, k, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(vsum));
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = sagellm::first_lanes(n - t);
    _mm512_mask_storeu_ps(s + t, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + t), inv));
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SAGELLM_DECODE_BF16 1
// 16 vectors of 16 partial sums -> one vector whose lane j is the sum of v[j]: halves,
// quarters, then pairs within quarters are added across vectors (46 instructions for 16
// dot products, where one horizontal sum each takes about 9)
inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  // w[i]: quarters (v[2i] A, v[2i] B, v[2i+1] A, v[2i+1] B)
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  // x[i]: quarter q holds 4 partial sums of v[4i + q]
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                         _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  const __m512 z = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]))));
  // z lane 4q + j holds the sum of v[4j + q]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// the cache row of position t of a sequence whose blocks are `table`
inline const uint16_t* row_at(const uint16_t* base, const int32_t* table, int64_t t,
                              int64_t block_size, int64_t b_stride, int64_t t_stride) {
  return base + table[t / block_size] * b_stride + (t % block_size) * t_stride;
}

// ask for a row of `lines` cache lines (64 bytes: 32 bf16) ahead of its use
inline void prefetch_row(const uint16_t* row, int64_t lines) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t z = 0; z < lines; ++z) _mm_prefetch(p + 64 * z, _MM_HINT_T0);
}

// one (sequence, KV head) task over a bfloat16 cache with bfloat16 queries (G rows of D,
// unscaled): dot products as bf16 pairs (vdpbf16ps) summed 16 keys at a time, a
// vectorised softmax, then the values weighted in float32
void attend_bf16(const uint16_t* q, const uint16_t* kp, const uint16_t* vp,
                 const int32_t* table, int64_t len, int64_t block_size, int64_t kb_stride,
                 int64_t kt_stride, int64_t vb_stride, int64_t vt_stride, int64_t G, int64_t D,
                 float scale, float* scores, float* acc) {
  const int64_t Z = D / 32;  // vectors of 32 bf16 per row
  __m512i qv[8][8];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t z = 0; z < Z; ++z) qv[g][z] = _mm512_loadu_si512(q + g * D + 32 * z);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    __m512 part[8][16];
    for (int64_t j = 0; j < 16; ++j) {
      if (j >= n) {
        for (int64_t g = 0; g < G; ++g) part[g][j] = _mm512_setzero_ps();
        continue;
      }
      const int64_t t = t0 + j;
      const uint16_t* kr = row_at(kp, table, t, block_size, kb_stride, kt_stride);
      if (t + 4 < len) prefetch_row(row_at(kp, table, t + 4, block_size, kb_stride, kt_stride), Z);
      __m512i kz[8];
      for (int64_t z = 0; z < Z; ++z) kz[z] = _mm512_loadu_si512(kr + 32 * z);
      for (int64_t g = 0; g < G; ++g) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t z = 0; z < Z; ++z) {
          __m512bh qb, kb;
          std::memcpy(&qb, &qv[g][z], sizeof(qb));
          std::memcpy(&kb, &kz[z], sizeof(kb));
          a = _mm512_dpbf16_ps(a, qb, kb);
        }
        part[g][j] = a;
      }
    }
    const __mmask16 m = sagellm::first_lanes(n);
    for (int64_t g = 0; g < G; ++g)
      _mm512_mask_storeu_ps(scores + g * len + t0, m, _mm512_mul_ps(sum16(part[g]), vscale));
  }
  for (int64_t g = 0; g < G; ++g) softmax_row(scores + g * len, len);
  const int64_t L = D / 16;
  __m512 a[8][kMaxLanes];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t l = 0; l < L; ++l) a[g][l] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const uint16_t* vr = row_at(vp, table, t, block_size, vb_stride, vt_stride);
    if (t + 4 < len) prefetch_row(row_at(vp, table, t + 4, block_size, vb_stride, vt_stride), Z);
    __m512 p[8];
    for (int64_t g = 0; g < G; ++g) p[g] = _mm512_set1_ps(scores[g * len + t]);
    for (int64_t l = 0; l < L; ++l) {
      const __m512 v = sagellm::load_bf16(vr + 16 * l);
      for (int64_t g = 0; g < G; ++g) a[g][l] = _mm512_fmadd_ps(p[g], v, a[g][l]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t l = 0; l < L; ++l) _mm512_storeu_ps(acc + g * D + 16 * l, a[g][l]);
}
#endif

// One (sequence, KV head) task: scores of its G query heads against every position,
// softmax, then the weighted sum of the values. q rows are pre-scaled float32.
template <typename C>
void attend_one(const float* qf, const C* kp, const C* vp, const int32_t* table,
                int64_t len, int64_t block_size, int64_t kb_stride, int64_t kt_stride,
                int64_t vb_stride, int64_t vt_stride, int64_t G, int64_t D, float* scores,
                float* acc, float* row) {
#if defined(__AVX512F__)
  if (D % 16 == 0 && D / 16 <= kMaxLanes && G <= 8) {
    const int64_t L = D / 16;
    __m512 qv[8][kMaxLanes];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < L; ++l) qv[g][l] = _mm512_loadu_ps(qf + g * D + 16 * l);
    for (int64_t t = 0; t < len; ++t) {
      const C* kr = kp + table[t / block_size] * kb_stride + (t % block_size) * kt_stride;
      __m512 s[8];
      for (int64_t g = 0; g < G; ++g) s[g] = _mm512_setzero_ps();
      for (int64_t l = 0; l < L; ++l) {
        const __m512 k = load16(kr + 16 * l);
        for (int64_t g = 0; g < G; ++g) s[g] = _mm512_fmadd_ps(qv[g][l], k, s[g]);
      }
      const float ks = row_scale(kr, D);
      for (int64_t g = 0; g < G; ++g) scores[g * len + t] = _mm512_reduce_add_ps(s[g]) * ks;
    }
    for (int64_t g = 0; g < G; ++g) softmax_row(scores + g * len, len);
    __m512 a[8][kMaxLanes];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < L; ++l) a[g][l] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const C* vr = vp + table[t / block_size] * vb_stride + (t % block_size) * vt_stride;
      const float vs = row_scale(vr, D);
      __m512 p[8];
      for (int64_t g = 0; g < G; ++g) p[g] = _mm512_set1_ps(scores[g * len + t] * vs);
      for (int64_t l = 0; l < L; ++l) {
        const __m512 v = load16(vr + 16 * l);
        for (int64_t g = 0; g < G; ++g) a[g][l] = _mm512_fmadd_ps(p[g], v, a[g][l]);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t l = 0; l < L; ++l) _mm512_storeu_ps(acc + g * D + 16 * l, a[g][l]);
    return;
  }
#endif
  for (int64_t t = 0; t < len; ++t) {
    const C* kr = kp + table[t / block_size] * kb_stride + (t % block_size) * kt_stride;
    load_row(kr, row, D);
    const float ks = row_scale(kr, D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float s = 0.f;
      for (int64_t i = 0; i < D; ++i) s += qg[i] * row[i];
      scores[g * len + t] = s * ks;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) m = sg[t] > m ? sg[t] : m;
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      sg[t] = std::exp(sg[t] - m);
      sum += sg[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const C* vr = vp + table[t / block_size] * vb_stride + (t % block_size) * vt_stride;
    load_row(vr, row, D);
    const float vs = row_scale(vr, D);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * len + t] * vs;
      float* ag = acc + g * D;
      for (int64_t i = 0; i < D; ++i) ag[i] += p * row[i];
    }
  }
}

template <typename T, typename C>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(2), block_size = k_cache.size(1);
  const int64_t row_len = k_cache.size(3);  // D, or D + 2 for an int8 row with its scale
  const int64_t G = H / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t kb_stride = k_cache.stride(0), kt_stride = k_cache.stride(1);
  const int64_t vb_stride = v_cache.stride(0), vt_stride = v_cache.stride(1);
  const T* qp = q.data_ptr<T>();
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kh = task % Hkv;
      const int64_t len = cl[b];
      TORCH_CHECK(len >= 1 && len <= max_blocks * block_size,
                  "context length ", len, " does not fit the block table");
      scores.resize(G * len);
#if defined(SAGELLM_DECODE_BF16)
      if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<C, at::BFloat16>) {
        if (D % 32 == 0 && D <= 256 && G <= 8) {
          attend_bf16(reinterpret_cast<const uint16_t*>(qp + (b * H + kh * G) * D),
                      reinterpret_cast<const uint16_t*>(kp + kh * row_len),
                      reinterpret_cast<const uint16_t*>(vp + kh * row_len), bt + b * max_blocks,
                      len, block_size, kb_stride, kt_stride, vb_stride, vt_stride, G, D, fscale,
                      scores.data(), acc.data());
          for (int64_t g = 0; g < G; ++g) {
            T* dst = op + (b * H + kh * G + g) * D;
            for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(acc[g * D + i]);
          }
          continue;
        }
      }
#endif
      for (int64_t g = 0; g < G; ++g) {
        load_row(qp + (b * H + kh * G + g) * D, qf.data() + g * D, D);
        for (int64_t i = 0; i < D; ++i) qf[g * D + i] *= fscale;
      }
      attend_one<C>(qf.data(), kp + kh * row_len, vp + kh * row_len, bt + b * max_blocks, len,
                    block_size,
                    kb_stride, kt_stride, vb_stride, vt_stride, G, D, scores.data(),
                    acc.data(), row.data());
      for (int64_t g = 0; g < G; ++g) {
        T* dst = op + (b * H + kh * G + g) * D;
        for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(acc[g * D + i]);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "q [B, H, D] and caches [blocks, block_size, H_kv, D] expected");
  TORCH_CHECK(q.is_contiguous(), "q must be contiguous");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.stride(2) == k_cache.size(3) &&
                  v_cache.stride(3) == 1 && v_cache.stride(2) == v_cache.size(3),
              "the caches' last two dims must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "the caches must have one dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "the caches must have one shape");
  // an int8 cache is quantized: each row's D values end in its float16 scale
  const int64_t want_row = q.size(2) + (k_cache.scalar_type() == at::kChar ? 2 : 0);
  TORCH_CHECK(k_cache.size(3) == want_row, "head_dim of q and the caches differ (q ",
              q.size(2), ", cache rows ", k_cache.size(3), "; an int8 cache holds D + 2)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(),
              "block_tables and context_lens must be contiguous");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
              "one block table and one context length per sequence");
  auto out = at::empty_like(q);
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
#define SAGELLM_CASE(QT, CT, TQ, TC)                                                      \
  if (qt == QT && ct == CT) {                                                             \
    decode_attention<TQ, TC>(q, k_cache, v_cache, block_tables, context_lens, scale, out); \
    return out;                                                                           \
  }
  SAGELLM_CASE(at::kFloat, at::kFloat, float, float)
  SAGELLM_CASE(at::kBFloat16, at::kBFloat16, at::BFloat16, at::BFloat16)
  SAGELLM_CASE(at::kHalf, at::kHalf, at::Half, at::Half)
  SAGELLM_CASE(at::kFloat, at::kBFloat16, float, at::BFloat16)
  SAGELLM_CASE(at::kFloat, at::kHalf, float, at::Half)
  SAGELLM_CASE(at::kFloat, at::kChar, float, int8_t)
  SAGELLM_CASE(at::kBFloat16, at::kChar, at::BFloat16, int8_t)
  SAGELLM_CASE(at::kHalf, at::kChar, at::Half, int8_t)
#undef SAGELLM_CASE
  TORCH_CHECK(false, "paged_decode_attention: q ", qt, " with caches ", ct,
              " is not supported (float32, bfloat16 or float16; a float32 q may read "
              "bfloat16 or float16 caches; any of them an int8 cache with row scales)");
  return out;
}

}  // namespace sagellm

void register_fused_ops(pybind11::module& m);  // fused_ops.cpp
void register_gguf_ops(pybind11::module& m);
void register_prefill_ops(pybind11::module& m);  // prefill_attention.cpp
void register_decode_step(pybind11::module& m);  // decode_step.cpp
void register_int8_ops(pybind11::module& m);     // int8_linear.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &sagellm::paged_decode_attention,
        "decode attention over a paged KV cache, read in place", pybind11::call_guard<pybind11::gil_scoped_release>());
  register_fused_ops(m);
  register_gguf_ops(m);
  register_prefill_ops(m);
  register_decode_step(m);
  register_int8_ops(m);
}

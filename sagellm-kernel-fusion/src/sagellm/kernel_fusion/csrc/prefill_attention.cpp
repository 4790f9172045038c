// Causal attention of a multi-token chunk (prefill, or a continuation after a cached
// prefix) on the CPU, flash-style: each query row keeps a running maximum, sum and output
// while it walks the key blocks up to its own position, so no [T, S] score matrix is ever
// materialised and key blocks past the diagonal are never computed.
//
// Layouts: q [T, H, D]; k, v [S, H_kv, D]; out [T, H, D] (written in place). The first dim
// of each may have any stride; the last two are contiguous. Query row i sits at absolute
// position start + i and attends keys 0 .. start + i (S = start + T). Grouped-query
// attention: query head h reads KV head h / (H / H_kv).
//
// bfloat16 with AVX512-BF16: keys and values are first repacked per KV head into the
// pair-interleaved layout `vdpbf16ps` consumes (two consecutive elements of the reduced
// dimension in one 32-bit lane), then
//   scores  S[r, 16 keys] += q[r, 2d:2d+2] . K[16 keys, 2d:2d+2]     (QK^T, fp32 accumulate)
//   output  O[r, 16 dims] += p[r, 2t:2t+2] . V[2t:2t+2, 16 dims]     (PV, p rounded to bf16)
// with 4 query rows sharing every key and value register (register blocking 4 x 64 keys).
// The softmax runs in float32 with a vectorised exp. Other dtypes and CPUs are refused
// (`prefill_attention_supported`), and the engine keeps torch's SDPA for them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "vec_math.h"
#define SAGELLM_PREFILL_BF16 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include "vec_math.h"
#define SAGELLM_PREFILL_F32 1
#endif

namespace {

// Every head's query rows in tasks of rows_per_task (enough tasks to balance the threads;
// the causal triangle is spread over each head's tasks, and consecutive tasks, one
// thread's share, cover whole heads), R rows at a time: attend(h, g, q rows, positions,
// out rows, scratch) for query head h over KV head g; a short tail repeats its last row
// with a null out row. `scratch` is per thread, scratch_size elements.
template <int R, typename T, typename Attend>
void for_row_groups(const T* q, int64_t q_stride, T* out, int64_t o_stride, int64_t T_,
                    int64_t start, int64_t H, int64_t Hkv, int64_t D, int64_t rows_per_task,
                    int64_t scratch_size, const Attend& attend) {
  const int64_t group = H / Hkv;
  const int64_t blocks = (T_ + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(scratch_size));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / blocks, qb = task % blocks;
      const int64_t row_end = std::min(T_, (qb + 1) * rows_per_task);
      for (int64_t i = qb * rows_per_task; i < row_end; i += R) {
        const T* qr[R];
        T* orow[R];
        int64_t pos[R];
        for (int r = 0; r < R; ++r) {
          const int64_t row = std::min(i + r, row_end - 1);
          qr[r] = q + row * q_stride + h * D;
          orow[r] = i + r < row_end ? out + row * o_stride + h * D : nullptr;
          pos[r] = start + row;
        }
        attend(h, h / group, qr, pos, orow, scratch.data());
      }
    }
  });
}

#if defined(SAGELLM_PREFILL_BF16)

constexpr int64_t kKeyBlock = 64;  // keys per block: 4 vectors of 16 scores
constexpr int64_t kGroups = kKeyBlock / 16;

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// Kp[g][key group of 16][d pair][16 keys][2] and Vp[g][key pair][D][2], zero-padded to
// whole key blocks
void pack_kv(const uint16_t* k, const uint16_t* v, int64_t k_stride, int64_t v_stride,
             int64_t S, int64_t Sp, int64_t Hkv, int64_t D, uint16_t* kp, uint16_t* vp) {
  const int64_t pairs = D / 2;
  const int64_t groups = Sp / 16;
  at::parallel_for(0, Hkv * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / groups, kg = task % groups;
      uint16_t* kdst = kp + (g * groups + kg) * 16 * D;
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t t = kg * 16 + j;
        if (t < S) {
          const uint16_t* src = k + t * k_stride + g * D;
          for (int64_t d2 = 0; d2 < pairs; ++d2) {
            kdst[(d2 * 16 + j) * 2] = src[2 * d2];
            kdst[(d2 * 16 + j) * 2 + 1] = src[2 * d2 + 1];
          }
        } else {
          for (int64_t d2 = 0; d2 < pairs; ++d2) {
            kdst[(d2 * 16 + j) * 2] = 0;
            kdst[(d2 * 16 + j) * 2 + 1] = 0;
          }
        }
      }
      // the 8 key pairs of this group of 16 keys
      for (int64_t kk = kg * 8; kk < kg * 8 + 8; ++kk) {
        uint16_t* vdst = vp + (g * (Sp / 2) + kk) * 2 * D;
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t t = 2 * kk + e;
          if (t < S) {
            const uint16_t* src = v + t * v_stride + g * D;
            for (int64_t d = 0; d < D; ++d) vdst[2 * d + e] = src[d];
          } else {
            for (int64_t d = 0; d < D; ++d) vdst[2 * d + e] = 0;
          }
        }
      }
    }
  });
}

// R query rows of one head (positions pos[0..R-1], rows q[r]) against keys 0..pos[r] of
// one KV head; LD = D / 16 output vectors per row
template <int LD, int R>
void attend_rows(const uint16_t* const* q, const int64_t* pos, const uint16_t* kp,
                 const uint16_t* vp, float scale, uint16_t* const* out) {
  constexpr int64_t D = 16 * LD;
  constexpr int64_t pairs = D / 2;
  float m[R], l[R];
  alignas(64) float acc[R][D];
  for (int r = 0; r < R; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
    for (int64_t d = 0; d < D; ++d) acc[r][d] = 0.f;
  }
  int64_t last = pos[0];
  for (int r = 1; r < R; ++r) last = std::max(last, pos[r]);
  const int64_t blocks = last / kKeyBlock + 1;
  const __m512 vscale = _mm512_set1_ps(scale);
  alignas(64) uint16_t pb[R][kKeyBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    // scores of the R rows against the block's 64 keys
    __m512 s[R][kGroups];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kGroups; ++j) s[r][j] = _mm512_setzero_ps();
    const uint16_t* kb = kp + b * kGroups * 16 * D;
    for (int64_t d2 = 0; d2 < pairs; ++d2) {
      __m512i kv[kGroups];
      for (int j = 0; j < kGroups; ++j)
        kv[j] = _mm512_loadu_si512(kb + (j * pairs + d2) * 32);
      for (int r = 0; r < R; ++r) {
        int32_t qpair;
        std::memcpy(&qpair, q[r] + 2 * d2, sizeof(qpair));
        const __m512bh qb = as_bh(_mm512_set1_epi32(qpair));
        for (int j = 0; j < kGroups; ++j) s[r][j] = _mm512_dpbf16_ps(s[r][j], qb, as_bh(kv[j]));
      }
    }
    // online softmax: the block's probabilities (bf16 pairs) and each row's rescale
    for (int r = 0; r < R; ++r) {
      __mmask16 valid[kGroups];
      __m512 bmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int j = 0; j < kGroups; ++j) {
        valid[j] = sagellm::first_lanes(pos[r] + 1 - (b * kKeyBlock + j * 16));
        s[r][j] = _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                     valid[j], s[r][j], vscale);
        bmax = _mm512_max_ps(bmax, s[r][j]);
      }
      const float block_max = _mm512_reduce_max_ps(bmax);
      const float m_new = std::max(m[r], block_max);
      if (m_new == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
        std::memset(pb[r], 0, sizeof(pb[r]));
        continue;
      }
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible block
      const __m512 vm = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      __m512 p[kGroups];
      for (int j = 0; j < kGroups; ++j) {
        p[j] = _mm512_maskz_mov_ps(valid[j], sagellm::exp512(_mm512_sub_ps(s[r][j], vm)));
        sum = _mm512_add_ps(sum, p[j]);
      }
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
      if (alpha != 1.f) {
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_store_ps(acc[r] + d, _mm512_mul_ps(_mm512_load_ps(acc[r] + d), va));
      }
      for (int j = 0; j < kGroups; j += 2) {
        // keys 16j .. 16j+31 as 16 bf16 pairs (lower half from p[j])
        const __m512bh packed = _mm512_cvtne2ps_pbh(p[j + 1], p[j]);
        std::memcpy(pb[r] + 16 * j, &packed, sizeof(packed));
      }
    }
    // the block's values, weighted
    __m512 o[R][LD];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < LD; ++i) o[r][i] = _mm512_load_ps(acc[r] + 16 * i);
    const uint16_t* vb = vp + b * (kKeyBlock / 2) * 2 * D;
    const int64_t pair_end = std::min<int64_t>(kKeyBlock / 2, (last + 2 - b * kKeyBlock) / 2);
    for (int64_t kk = 0; kk < pair_end; ++kk) {
      __m512i vv[LD];
      for (int i = 0; i < LD; ++i) vv[i] = _mm512_loadu_si512(vb + kk * 2 * D + 32 * i);
      for (int r = 0; r < R; ++r) {
        int32_t ppair;
        std::memcpy(&ppair, pb[r] + 2 * kk, sizeof(ppair));
        const __m512bh pp = as_bh(_mm512_set1_epi32(ppair));
        for (int i = 0; i < LD; ++i) o[r][i] = _mm512_dpbf16_ps(o[r][i], pp, as_bh(vv[i]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < LD; ++i) _mm512_store_ps(acc[r] + 16 * i, o[r][i]);
  }
  for (int r = 0; r < R; ++r) {
    if (out[r] == nullptr) continue;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int i = 0; i < LD; ++i) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * i), inv));
      std::memcpy(out[r] + 16 * i, &h, sizeof(h));
    }
  }
}

template <int LD, int R>
void run_heads(const uint16_t* q, int64_t q_stride, const uint16_t* kp, const uint16_t* vp,
               uint16_t* out, int64_t o_stride, int64_t T, int64_t start, int64_t H,
               int64_t Hkv, int64_t Sp, float scale, int64_t rows_per_task) {
  constexpr int64_t D = 16 * LD;
  for_row_groups<R>(q, q_stride, out, o_stride, T, start, H, Hkv, D, rows_per_task, 0,
                    [&](int64_t, int64_t g, const uint16_t* const* qr, const int64_t* pos,
                        uint16_t* const* orow, float*) {
                      attend_rows<LD, R>(qr, pos, kp + g * Sp * D, vp + g * Sp * D, scale, orow);
                    });
}

#endif  // SAGELLM_PREFILL_BF16

#if defined(SAGELLM_PREFILL_F32)

// float32 with AVX2 + FMA: keys are transposed per KV head into groups of 8 (kt[group][d][8
// keys], zero-padded to whole blocks) so that a row's scores against 8 keys are one
// vector, built by broadcasting q[d] against the group's d-th vector; values are read in
// place (8 consecutive dims of a row are one vector). R query rows share every key and
// value load; blocks of 16 keys; online softmax in float32 with exp256.
constexpr int64_t kF32Block = 16;

void pack_k_f32(const float* k, int64_t k_stride, int64_t S, int64_t Sp, int64_t Hkv,
                int64_t D, float* kt) {
  const int64_t groups = Sp / 8;
  at::parallel_for(0, Hkv * groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / groups, kg = task % groups;
      float* dst = kt + (g * groups + kg) * D * 8;
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t t = kg * 8 + j;
        const float* src = k + t * k_stride + g * D;
        for (int64_t d = 0; d < D; ++d) dst[d * 8 + j] = t < S ? src[d] : 0.f;
      }
    }
  });
}

// R query rows of one head (q[r], at positions pos[r]) against one KV head: kt its
// transposed keys, v its values (row stride v_stride); acc is [R, D] scratch
template <int R>
void attend_rows_f32(const float* const* q, const int64_t* pos, const float* kt,
                     const float* v, int64_t v_stride, int64_t D, float scale,
                     float* const* out, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float m[R], l[R];
  int64_t last = pos[0];
  for (int r = 0; r < R; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
    last = std::max(last, pos[r]);
  }
  std::fill(acc, acc + R * D, 0.f);
  const int64_t blocks = last / kF32Block + 1;
  const __m256 vscale = _mm256_set1_ps(scale);
  alignas(32) float pb[R][kF32Block];
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_ps();
    const float* k0 = kt + 2 * b * D * 8;
    const float* k1 = k0 + D * 8;
    for (int64_t d = 0; d < D; ++d) {
      const __m256 kv0 = _mm256_loadu_ps(k0 + d * 8);
      const __m256 kv1 = _mm256_loadu_ps(k1 + d * 8);
      for (int r = 0; r < R; ++r) {
        const __m256 qb = _mm256_broadcast_ss(q[r] + d);
        s[r][0] = _mm256_fmadd_ps(qb, kv0, s[r][0]);
        s[r][1] = _mm256_fmadd_ps(qb, kv1, s[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t visible = pos[r] + 1 - b * kF32Block;
      if (visible <= 0) {  // the whole block is past this row's diagonal
        std::fill(pb[r], pb[r] + kF32Block, 0.f);
        continue;
      }
      const __m256 m0 = sagellm::first_lanes8(visible), m1 = sagellm::first_lanes8(visible - 8);
      const __m256 neg = _mm256_set1_ps(kNegInf);
      const __m256 x0 = _mm256_blendv_ps(neg, _mm256_mul_ps(s[r][0], vscale), m0);
      const __m256 x1 = _mm256_blendv_ps(neg, _mm256_mul_ps(s[r][1], vscale), m1);
      const float m_new = std::max(m[r], sagellm::hmax256(_mm256_max_ps(x0, x1)));
      const float alpha = std::exp(m[r] - m_new);  // 0 on the first visible block
      const __m256 vm = _mm256_set1_ps(m_new);
      const __m256 p0 = _mm256_and_ps(sagellm::exp256(_mm256_sub_ps(x0, vm)), m0);
      const __m256 p1 = _mm256_and_ps(sagellm::exp256(_mm256_sub_ps(x1, vm)), m1);
      l[r] = l[r] * alpha + sagellm::hsum256(_mm256_add_ps(p0, p1));
      m[r] = m_new;
      if (alpha != 1.f) {
        const __m256 va = _mm256_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(acc + r * D + d, _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + d), va));
      }
      _mm256_store_ps(pb[r], p0);
      _mm256_store_ps(pb[r] + 8, p1);
    }
    // the block's values, weighted, 16 dims (two vectors) of every row at a time
    const int64_t keys = std::min<int64_t>(kF32Block, last + 1 - b * kF32Block);
    const float* vb = v + b * kF32Block * v_stride;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const bool two = d0 + 16 <= D;  // D % 16 == 8: the last chunk is one vector
      __m256 o[R][2];
      for (int r = 0; r < R; ++r) {
        o[r][0] = _mm256_loadu_ps(acc + r * D + d0);
        o[r][1] = two ? _mm256_loadu_ps(acc + r * D + d0 + 8) : _mm256_setzero_ps();
      }
      for (int64_t t = 0; t < keys; ++t) {
        const float* vr = vb + t * v_stride + d0;
        const __m256 v0 = _mm256_loadu_ps(vr);
        const __m256 v1 = two ? _mm256_loadu_ps(vr + 8) : _mm256_setzero_ps();
        for (int r = 0; r < R; ++r) {
          const __m256 pr = _mm256_broadcast_ss(pb[r] + t);
          o[r][0] = _mm256_fmadd_ps(pr, v0, o[r][0]);
          o[r][1] = _mm256_fmadd_ps(pr, v1, o[r][1]);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(acc + r * D + d0, o[r][0]);
        if (two) _mm256_storeu_ps(acc + r * D + d0 + 8, o[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if (out[r] == nullptr) continue;
    const float inv = 1.f / l[r];
    for (int64_t d = 0; d < D; ++d) out[r][d] = acc[r * D + d] * inv;
  }
}

void run_heads_f32(const float* q, int64_t q_stride, const float* kt, const float* v,
                   int64_t v_stride, float* out, int64_t o_stride, int64_t T, int64_t start,
                   int64_t H, int64_t Hkv, int64_t D, int64_t Sp, float scale,
                   int64_t rows_per_task) {
  constexpr int R = 4;
  for_row_groups<R>(q, q_stride, out, o_stride, T, start, H, Hkv, D, rows_per_task, R * D,
                    [&](int64_t, int64_t g, const float* const* qr, const int64_t* pos,
                        float* const* orow, float* acc) {
                      attend_rows_f32<R>(qr, pos, kt + g * Sp * D, v + g * D, v_stride, D,
                                         scale, orow, acc);
                    });
}

#endif  // SAGELLM_PREFILL_F32

void check_rows(const torch::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-d [tokens, heads, head_dim], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              " must be contiguous in its last two dims (strides ", t.strides(), ")");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " like q, got ",
              t.scalar_type());
}

}  // namespace

bool prefill_attention_supported(torch::ScalarType dtype, int64_t head_dim) {
#if defined(SAGELLM_PREFILL_BF16)
  if (dtype == at::kBFloat16 && head_dim % 16 == 0 && head_dim >= 16 &&
      (head_dim <= 128 || head_dim == 256))
    return true;
#endif
#if defined(SAGELLM_PREFILL_F32)
  if (dtype == at::kFloat && head_dim % 8 == 0 && head_dim >= 8 && head_dim <= 256) return true;
#endif
  (void)dtype;
  (void)head_dim;
  return false;
}

void prefill_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       torch::Tensor& out, int64_t start, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-d [tokens, heads, head_dim], got ", q.sizes());
  const auto dtype = q.scalar_type();
  check_rows(q, "q", dtype);
  check_rows(k, "k", dtype);
  check_rows(v, "v", dtype);
  check_rows(out, "out", dtype);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t S = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(prefill_attention_supported(q.scalar_type(), D),
              "prefill_attention: no kernel for ", q.scalar_type(), " with head_dim ", D,
              " on this CPU (bfloat16 needs AVX512-BF16 and head_dim 16, 32, ..., 128 or 256; "
              "float32 needs AVX2 + FMA and head_dim 8, 16, ..., 256)");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.size(2) == D, "k has head_dim ", k.size(2), ", q ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads ", H, " are not a multiple of KV heads ",
              Hkv);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must be shaped like q ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(start >= 0 && start + T == S, "start (", start, ") + query rows (", T,
              ") must equal the key rows (", S, ")");
  if (T == 0) return;
#if defined(SAGELLM_PREFILL_F32)
  if (dtype == at::kFloat) {
    const int64_t Sp = (S + kF32Block - 1) / kF32Block * kF32Block;
    std::vector<float> kt(static_cast<size_t>(Hkv * Sp * D));
    pack_k_f32(k.data_ptr<float>(), k.stride(0), S, Sp, Hkv, D, kt.data());
    run_heads_f32(q.data_ptr<float>(), q.stride(0), kt.data(), v.data_ptr<float>(), v.stride(0),
                  out.data_ptr<float>(), out.stride(0), T, start, H, Hkv, D, Sp,
                  static_cast<float>(scale), 32);
    return;
  }
#endif
#if defined(SAGELLM_PREFILL_BF16)
  const int64_t Sp = (S + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  std::vector<uint16_t> kp(static_cast<size_t>(Hkv * Sp * D));
  std::vector<uint16_t> vp(static_cast<size_t>(Hkv * Sp * D));
  const auto* k_ptr = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* v_ptr = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  pack_kv(k_ptr, v_ptr, k.stride(0), v.stride(0), S, Sp, Hkv, D, kp.data(), vp.data());
  const auto* q_ptr = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  auto* o_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // enough tasks to balance the threads; the causal triangle is spread over each head's
  // blocks, and consecutive tasks (one thread's share) cover whole heads
  const int64_t rows = 32;
  const float s = static_cast<float>(scale);
  const int64_t qs = q.stride(0), os = out.stride(0);
  switch (D / 16) {
    case 1: run_heads<1, 4>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 2: run_heads<2, 4>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 3: run_heads<3, 4>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 4: run_heads<4, 4>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 5: run_heads<5, 2>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 6: run_heads<6, 2>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 7: run_heads<7, 2>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    case 8: run_heads<8, 2>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
    default: run_heads<16, 1>(q_ptr, qs, kp.data(), vp.data(), o_ptr, os, T, start, H, Hkv, Sp, s, rows); break;
  }
#endif
}

void register_prefill_ops(pybind11::module& m) {
  m.def("prefill_attention", &prefill_attention,
        "causal flash attention of a chunk after `start` cached positions, into out",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("prefill_attention_supported", &prefill_attention_supported,
        "whether prefill_attention has a kernel for this dtype and head_dim here");
}

// Matrix products on GGUF weight blocks (Q4_0, Q4_1, Q8_0), for the few-row steps of
// decoding. Weights stay in their 4- or 8-bit blocks of 32; each call rounds its input
// rows onto integers in blocks of 32 (one float scale per block, as GGUF's Q8 activation
// blocks do) and takes the integer dot products 32 at a time with AVX2's (or, for 16-bit
// inputs, AVX-512's) integer multiply-adds:
//
//   y[m, n] = sum_b d[n, b] * dx[m, b] * dot(q[n, b], qx[m, b]) + c[n, b] * xs[m, b]
//
// where q are a block's stored codes, d its scale, c its constant term (Q4_1: the block
// minimum m; Q4_0: -8 d, since its weights are d * (q - 8); Q8_0: none), dx the input
// block's scale and xs the exact float sum of the input block.
//
// Input precision (``input_bits``): 8 rounds each input value to amax / 127 steps of its
// block (GGUF's own CPU path; half a step of error), multiplied as u8 x s8 pairs
// (maddubs); 16 rounds it to amax / 32767 steps, one int16 per value, multiplied as
// int16 pairs (madd) with the weights widened to int16 once per block and shared by the
// rows of a pass; the product then matches float arithmetic on the stored weights to
// about 1e-4 relative. Neither overflows: a block's pair sums stay below 2^24.
//
// Layout, prepared once from the GGUF blocks (sagellm.kernel_fusion.gguf):
//   q4: codes uint8 [N, K / 2], each block's 16 bytes as stored: byte j holds element j
//       in its low nibble and element j + 16 in its high one;
//   q8: codes int8 [N, K];
//   d, c: float16 [N, K / 32], as the blocks store them (c empty for Q8_0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SAGELLM_GGUF_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// int16 inputs: a whole block (32 weights widened to int16) per 512-bit multiply-add
#define SAGELLM_GGUF_AVX512 1
#endif
#endif

namespace sagellm {
namespace {

constexpr int64_t QK = 32;  // values per block
constexpr int64_t MAX_TILE = 4;  // input rows sharing one pass over a weight block

// Block scales and constant terms are stored as float16, as in the GGUF blocks themselves
// (exact), which reads a quarter fewer bytes per Q4 block than float32 (20 instead of 24).
using Scale = at::Half;

inline float f16(Scale h) {
#if defined(SAGELLM_GGUF_AVX2)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// Input rows as integer blocks: qx int8 [M, K] (8 bits) or qw int16 [M, K] (16 bits), dx
// and xs [M, K / 32]; dx is the scale of one unit of the returned integer dot product.
struct QuantizedInput {
  std::vector<int8_t> qx;    // 8-bit input: one int8 per value
  std::vector<int16_t> qw;   // 16-bit input: one int16 per value
  std::vector<float> dx, xs;
};

template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }

template <typename T>
QuantizedInput quantize_input(const T* x, int64_t m, int64_t k, bool wide) {
  const int64_t nb = k / QK;
  QuantizedInput out;
  if (wide) {
    out.qw.resize(m * k);
  } else {
    out.qx.resize(m * k);
  }
  out.dx.resize(m * nb);
  out.xs.resize(m * nb);
  const float qmax = wide ? 32767.f : 127.f;
  at::parallel_for(0, m * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* src = x + i * QK;  // rows are contiguous: block i of the flat input
      float v[QK];
      float amax = 0.f, sum = 0.f;
      for (int64_t j = 0; j < QK; ++j) {
        v[j] = to_f32(src[j]);
        amax = std::max(amax, std::fabs(v[j]));
        sum += v[j];
      }
      const float d = amax / qmax;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      if (wide) {
        int16_t* q = out.qw.data() + i * QK;
        for (int64_t j = 0; j < QK; ++j) q[j] = static_cast<int16_t>(std::nearbyint(v[j] * inv));
      } else {
        int8_t* q = out.qx.data() + i * QK;
        for (int64_t j = 0; j < QK; ++j) q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
      }
      out.dx[i] = d;
      out.xs[i] = sum;
    }
  });
  return out;
}

#ifdef SAGELLM_GGUF_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 32 codes of a Q4 block in element order, as unsigned bytes 0..15
inline __m256i unpack_q4(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  return _mm256_set_m128i(hi, lo);
}
#endif

#ifdef SAGELLM_GGUF_AVX512
// The int16-input product with AVX-512: a block's 32 weights widened to int16 in one
// register, one multiply-add per block and row (16 pair sums) where AVX2 takes two; the
// integer block dots are the same, only the float summation order of the scaled dots
// differs.
template <bool Q4>
inline __m512i widen_block(const uint8_t* codes, int64_t b) {
  if constexpr (Q4) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * (QK / 2)));
    const __m128i lo = _mm_and_si128(raw, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    return _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
  } else {
    return _mm512_cvtepi8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b * QK)));
  }
}

template <bool Q4, int TILE>
void row_tile_wide512(const uint8_t* codes, const Scale* d, const QuantizedInput& in,
                      int64_t k, int64_t m0, float* acc_out) {
  const int64_t nb = k / QK;
  // two accumulators per row, even and odd blocks: the multiply-adds of one row do not
  // wait on each other's latency
  __m512 acc[2][TILE];
  for (int t = 0; t < TILE; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
  alignas(64) float scale[TILE][16];
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t span = std::min<int64_t>(16, nb - b0);
    const __mmask16 lanes = span == 16 ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << span) - 1u);
    // the 16 blocks' weight scales times each row's input scales, all at once
    const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, d + b0));
    for (int t = 0; t < TILE; ++t) {
      const __m512 dx = _mm512_maskz_loadu_ps(lanes, in.dx.data() + (m0 + t) * nb + b0);
      _mm512_store_ps(scale[t], _mm512_mul_ps(dv, dx));
    }
    int64_t j = 0;
    for (; j + 2 <= span; j += 2) {
      const int64_t b = b0 + j;
      const __m512i w0 = widen_block<Q4>(codes, b);
      const __m512i w1 = widen_block<Q4>(codes, b + 1);
      for (int t = 0; t < TILE; ++t) {
        const int16_t* x = in.qw.data() + (m0 + t) * k + b * QK;
        const __m512i p0 = _mm512_madd_epi16(w0, _mm512_loadu_si512(x));
        const __m512i p1 = _mm512_madd_epi16(w1, _mm512_loadu_si512(x + QK));
        acc[0][t] = _mm512_fmadd_ps(_mm512_set1_ps(scale[t][j]), _mm512_cvtepi32_ps(p0), acc[0][t]);
        acc[1][t] =
            _mm512_fmadd_ps(_mm512_set1_ps(scale[t][j + 1]), _mm512_cvtepi32_ps(p1), acc[1][t]);
      }
    }
    if (j < span) {
      const int64_t b = b0 + j;
      const __m512i w0 = widen_block<Q4>(codes, b);
      for (int t = 0; t < TILE; ++t) {
        const int16_t* x = in.qw.data() + (m0 + t) * k + b * QK;
        const __m512i p0 = _mm512_madd_epi16(w0, _mm512_loadu_si512(x));
        acc[0][t] = _mm512_fmadd_ps(_mm512_set1_ps(scale[t][j]), _mm512_cvtepi32_ps(p0), acc[0][t]);
      }
    }
  }
  for (int t = 0; t < TILE; ++t) {
    acc_out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]));
  }
}
#endif

// acc_out[t] += sum_b c[b] * xs[m0 + t, b]: the constant term (Q4 minima), every path
template <int TILE>
void add_constant_terms(const Scale* c, const QuantizedInput& in, int64_t nb, int64_t m0,
                        float* acc_out) {
  if (c == nullptr) return;
  for (int t = 0; t < TILE; ++t) {
    const float* xs = in.xs.data() + (m0 + t) * nb;
    float s = 0.f;
    int64_t b = 0;
#if defined(SAGELLM_GGUF_AVX2)
    __m256 sv = _mm256_setzero_ps();  // 8 blocks at a time
    for (; b + 8 <= nb; b += 8) {
      const __m256 cv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + b)));
      sv = _mm256_fmadd_ps(cv, _mm256_loadu_ps(xs + b), sv);
    }
    s = hsum(sv);
#endif
    for (; b < nb; ++b) s += f16(c[b]) * xs[b];
    acc_out[t] += s;
  }
}

// One output row n against input rows m0 .. m0 + TILE - 1.
template <bool Q4, bool WIDE, int TILE>
void row_tile(const uint8_t* codes, const Scale* d, const Scale* c, const QuantizedInput& in,
              int64_t k, int64_t m0, float* acc_out) {
  const int64_t nb = k / QK;
#ifdef SAGELLM_GGUF_AVX512
  if constexpr (WIDE) {
    row_tile_wide512<Q4, TILE>(codes, d, in, k, m0, acc_out);
    add_constant_terms<TILE>(c, in, nb, m0, acc_out);
    return;
  }
#endif
#ifdef SAGELLM_GGUF_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  // two accumulators per row, even and odd blocks, so the multiply-adds of one row do
  // not wait on each other's latency
  __m256 acc0[TILE], acc1[TILE];
  for (int t = 0; t < TILE; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
  // the weight scales (float16) times the input scales, 16 blocks at a time, ahead of
  // the multiply-adds that broadcast them
  alignas(32) float scale[TILE][16];
  auto block = [&](int64_t b, int64_t j, __m256* acc) __attribute__((always_inline)) {
    __m256i w;
    if constexpr (Q4) {
      w = unpack_q4(codes + b * (QK / 2));
    } else {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b * QK));
    }
    if constexpr (WIDE) {
      // the block's 32 weights as int16, then int16 x int16 pair sums into int32
      const __m128i w0 = _mm256_castsi256_si128(w), w1 = _mm256_extracti128_si256(w, 1);
      const __m256i wl = Q4 ? _mm256_cvtepu8_epi16(w0) : _mm256_cvtepi8_epi16(w0);
      const __m256i wh = Q4 ? _mm256_cvtepu8_epi16(w1) : _mm256_cvtepi8_epi16(w1);
      for (int t = 0; t < TILE; ++t) {
        const int64_t m = m0 + t;
        const int16_t* xq = in.qw.data() + m * k + b * QK;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
        const __m256i p32 = _mm256_add_epi32(_mm256_madd_epi16(wl, x0), _mm256_madd_epi16(wh, x1));
        acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[t][j]),
                                 _mm256_cvtepi32_ps(p32), acc[t]);
      }
    } else {
      const __m256i wa = Q4 ? w : _mm256_sign_epi8(w, w);  // unsigned operand
      for (int t = 0; t < TILE; ++t) {
        const int64_t m = m0 + t;
        const int64_t at = m * k + b * QK;
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in.qx.data() + at));
        if constexpr (!Q4) xv = _mm256_sign_epi8(xv, w);  // the weight's sign moves to x
        const __m256i p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones);
        acc[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[t][j]),
                                 _mm256_cvtepi32_ps(p32), acc[t]);
      }
    }
  };
  for (int64_t b0 = 0; b0 < nb; b0 += 16) {
    const int64_t span = std::min<int64_t>(16, nb - b0);
    alignas(32) float dv[16];
    int64_t j = 0;
    for (; j + 8 <= span; j += 8) {
      _mm256_store_ps(dv + j, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(d + b0 + j))));
    }
    for (; j < span; ++j) dv[j] = f16(d[b0 + j]);
    for (int t = 0; t < TILE; ++t) {
      const float* dx = in.dx.data() + (m0 + t) * nb + b0;
      for (j = 0; j < span; ++j) scale[t][j] = dv[j] * dx[j];
    }
    for (j = 0; j + 2 <= span; j += 2) {
      block(b0 + j, j, acc0);
      block(b0 + j + 1, j + 1, acc1);
    }
    if (j < span) block(b0 + j, j, acc0);
  }
  for (int t = 0; t < TILE; ++t) acc_out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t]));
#else
  for (int t = 0; t < TILE; ++t) {
    const int64_t m = m0 + t;
    float total = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = m * k + b * QK;
      int32_t dot = 0;
      for (int64_t j = 0; j < QK; ++j) {
        int32_t w;
        if constexpr (Q4) {
          const uint8_t byte = codes[b * (QK / 2) + (j % (QK / 2))];
          w = j < QK / 2 ? (byte & 0x0F) : (byte >> 4);
        } else {
          w = reinterpret_cast<const int8_t*>(codes)[b * QK + j];
        }
        const int32_t xq = WIDE ? in.qw[at + j] : in.qx[at + j];
        dot += w * xq;
      }
      total += f16(d[b]) * in.dx[m * nb + b] * static_cast<float>(dot);
    }
    acc_out[t] = total;
  }
#endif
  add_constant_terms<TILE>(c, in, nb, m0, acc_out);
}

template <bool Q4, bool WIDE>
void gemm(const uint8_t* codes, const Scale* d, const Scale* c, const QuantizedInput& in,
          int64_t m, int64_t n, int64_t k, float* y) {
  const int64_t nb = k / QK;
  const int64_t row_bytes = Q4 ? k / 2 : k;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    float part[MAX_TILE];
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* cr = codes + r * row_bytes;
      const Scale* dr = d + r * nb;
      const Scale* ccr = c != nullptr ? c + r * nb : nullptr;
      int64_t m0 = 0;
      for (; m0 + 4 <= m; m0 += 4) {
        row_tile<Q4, WIDE, 4>(cr, dr, ccr, in, k, m0, part);
        for (int t = 0; t < 4; ++t) y[(m0 + t) * n + r] = part[t];
      }
      for (; m0 + 2 <= m; m0 += 2) {
        row_tile<Q4, WIDE, 2>(cr, dr, ccr, in, k, m0, part);
        for (int t = 0; t < 2; ++t) y[(m0 + t) * n + r] = part[t];
      }
      for (; m0 < m; ++m0) {
        row_tile<Q4, WIDE, 1>(cr, dr, ccr, in, k, m0, part);
        y[m0 * n + r] = part[0];
      }
    }
  });
}

}  // namespace

// x [M, K] (float32 or bfloat16); bits 4 (codes uint8 [N, K/2]) or 8 (codes int8 [N, K]);
// d [N, K/32]; c [N, K/32] or an empty tensor; input_bits 8 or 16 (see the top).
// Returns [M, N] in x's dtype.
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d,
                          torch::Tensor c, int64_t bits, int64_t input_bits) {
  TORCH_CHECK(x.dim() == 2, "gguf_linear: x must be [rows, K], got ", x.sizes());
  TORCH_CHECK(bits == 4 || bits == 8, "gguf_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(input_bits == 8 || input_bits == 16,
              "gguf_linear: input_bits must be 8 or 16, got ", input_bits);
  const bool wide = input_bits == 16;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gguf_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(k % QK == 0, "gguf_linear: K=", k, " is not a multiple of 32");
  TORCH_CHECK(codes.is_contiguous() && codes.size(1) == (bits == 4 ? k / 2 : k),
              "gguf_linear: codes must be contiguous [N, ", bits == 4 ? k / 2 : k, "], got ",
              codes.sizes());
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == n &&
                  d.size(1) == k / QK,
              "gguf_linear: d must be contiguous float16 [N, K/32]");
  const bool has_c = c.numel() > 0;
  if (has_c) {
    TORCH_CHECK(c.scalar_type() == at::kHalf && c.is_contiguous() && c.sizes() == d.sizes(),
                "gguf_linear: c must be contiguous float16 [N, K/32] like d");
  }
  x = x.contiguous();
  QuantizedInput in = x.scalar_type() == at::kFloat
                          ? quantize_input(x.data_ptr<float>(), m, k, wide)
                          : quantize_input(x.data_ptr<at::BFloat16>(), m, k, wide);
  auto y = torch::empty({m, n}, x.options().dtype(at::kFloat));
  const uint8_t* cp = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const Scale* cc = has_c ? c.data_ptr<at::Half>() : nullptr;
  float* yp = y.data_ptr<float>();
  const Scale* dp = d.data_ptr<at::Half>();
  if (bits == 4) {
    wide ? gemm<true, true>(cp, dp, cc, in, m, n, k, yp)
          : gemm<true, false>(cp, dp, cc, in, m, n, k, yp);
  } else {
    wide ? gemm<false, true>(cp, dp, cc, in, m, n, k, yp)
          : gemm<false, false>(cp, dp, cc, in, m, n, k, yp);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace sagellm

void register_gguf_ops(pybind11::module& m) {
  m.def("gguf_linear", &sagellm::gguf_linear,
        "x @ W.T on GGUF Q4_0/Q4_1/Q8_0 blocks, inputs rounded to 8 or 16 bits per block",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

// W8A8 projections of many rows: each input row quantized to int8 with a scale of its own
// (symmetric, amax / 127; stored as uint8 with zero point 128, the form oneDNN's int8
// matmul takes), oneDNN's int8 x int8 -> int32 product on the weight quantized per output
// channel and prepacked once (onednn::qlinear_pointwise, what inductor's x86 int8 path
// calls), then each output row multiplied by its input scale (and the bias added).
//
// oneDNN applies one scale to the whole input, so the product runs with input scale 1
// and the per-row scales are applied to its output: the result is
//   y[r, n] = s[r] * w_scale[n] * sum_k (qx[r, k] - 128) * qw[n, k]  (+ bias[n]).
// On AVX512-VNNI the int8 product does four multiply-adds per 32-bit lane where the
// bfloat16 one does two, which is what makes it pay for the quantization pass.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "kernels.h"
#include "vec_math.h"

namespace sagellm {
namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// rows of x [M, K] -> q uint8 [M, K] (x / s rounded to nearest even, plus 128) and
// s float32 [M] (amax(|x|) / 127, 1 for a row of zeros)
template <typename T>
void quantize_rows(const T* x, uint8_t* q, float* s, int64_t rows, int64_t k) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * k;
      uint8_t* qr = q + r * k;
      float amax = 0.f;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(to_f32(xr[i])));
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      const float inv = 1.f / scale;
      for (int64_t i = 0; i < k; ++i) {
        qr[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(to_f32(xr[i]) * inv)) + 128);
      }
      s[r] = scale;
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <typename T>
inline __m512 load16(const T* p, __mmask16 m);
template <>
inline __m512 load16<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p, __mmask16 m) {
  return load_bf16(p, m);
}

template <typename T>
void quantize_rows_avx512(const T* x, uint8_t* q, float* s, int64_t rows, int64_t k) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512i zero_point = _mm512_set1_epi32(128);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * k;
      uint8_t* qr = q + r * k;
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 m = first_lanes(k - i);
        vmax = _mm512_max_ps(vmax, _mm512_and_ps(load16(xr + i, m), sign));
      }
      const float amax = _mm512_reduce_max_ps(vmax);
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      const __m512 inv = _mm512_set1_ps(1.f / scale);
      for (int64_t i = 0; i < k; i += 16) {
        const __mmask16 m = first_lanes(k - i);
        // cvtps_epi32 rounds to nearest even, as std::nearbyint does
        const __m512i v = _mm512_add_epi32(
            _mm512_cvtps_epi32(_mm512_mul_ps(load16(xr + i, m), inv)), zero_point);
        _mm512_mask_cvtepi32_storeu_epi8(qr + i, m, v);
      }
      s[r] = scale;
    }
  });
}
#endif

// y [M, N] *= s[r] per row, then + bias (float32 arithmetic, rounded once to T)
template <typename T>
void scale_rows(T* y, const float* s, const float* bias, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* yr = y + r * n;
      const float sr = s[r];
      for (int64_t i = 0; i < n; ++i) {
        float v = to_f32(yr[i]) * sr;
        if (bias != nullptr) v += bias[i];
        yr[i] = static_cast<T>(v);
      }
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
template <>
void scale_rows<at::BFloat16>(at::BFloat16* y, const float* s, const float* bias, int64_t rows,
                              int64_t n) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      at::BFloat16* yr = y + r * n;
      const __m512 sr = _mm512_set1_ps(s[r]);
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = first_lanes(n - i);
        __m512 v = _mm512_mul_ps(load_bf16(yr + i, m), sr);
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + i));
        store_bf16(yr + i, v, m);
      }
    }
  });
}
#endif

template <typename T>
void quantize(const T* x, uint8_t* q, float* s, int64_t rows, int64_t k) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  quantize_rows_avx512(x, q, s, rows, k);
#else
  quantize_rows(x, q, s, rows, k);
#endif
}

at::Tensor qlinear(const at::Tensor& qx, const at::Tensor& weight, const at::Tensor& w_scales,
                   const at::Tensor& w_zero_points, at::ScalarType out_dtype) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(13);
  stack.emplace_back(qx);
  stack.emplace_back(1.0);           // x_scale: the rows' scales are applied afterwards
  stack.emplace_back(int64_t{128});  // x_zero_point
  stack.emplace_back(weight);
  stack.emplace_back(w_scales);
  stack.emplace_back(w_zero_points);
  stack.emplace_back(c10::IValue());  // bias: added after the row scales
  stack.emplace_back(1.0);            // output_scale
  stack.emplace_back(int64_t{0});     // output_zero_point
  stack.emplace_back(out_dtype);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

std::vector<at::Tensor> quantize_per_row(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantize_per_row: contiguous [M, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantize_per_row: float32 or bfloat16 input expected, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kByte));
  at::Tensor s = at::empty({m}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat) {
    quantize(x.data_ptr<float>(), q.data_ptr<uint8_t>(), s.data_ptr<float>(), m, k);
  } else {
    quantize(x.data_ptr<at::BFloat16>(), q.data_ptr<uint8_t>(), s.data_ptr<float>(), m, k);
  }
  return {q, s};
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scales,
                       const at::Tensor& w_zero_points, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "w8a8_linear: [M, K] input expected");
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.dim() == 1,
              "w8a8_linear: float32 weight scales [N] expected");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), n = w_scales.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "w8a8_linear: bias must be [", n, "]");
  }
  const at::ScalarType dtype = xc.scalar_type();
  auto qs = quantize_per_row(xc);
  at::Tensor y = qlinear(qs[0], weight, w_scales, w_zero_points, dtype);
  TORCH_CHECK(y.is_contiguous() && y.size(0) == m && y.size(1) == n,
              "w8a8_linear: the int8 product returned an unexpected shape");
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? b.data_ptr<float>() : nullptr;
  if (dtype == at::kFloat) {
    scale_rows(y.data_ptr<float>(), qs[1].data_ptr<float>(), bp, m, n);
  } else {
    scale_rows(y.data_ptr<at::BFloat16>(), qs[1].data_ptr<float>(), bp, m, n);
  }
  return y;
}

}  // namespace sagellm

void register_int8_ops(pybind11::module& m) {
  m.def("quantize_per_row", &sagellm::quantize_per_row,
        "rows -> (uint8 codes with zero point 128, float32 scales amax/127)", pybind11::arg("x"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("w8a8_linear", &sagellm::w8a8_linear,
        "x @ W.T with x quantized per row and W per channel (oneDNN int8 product)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("w_scales"),
        pybind11::arg("w_zero_points"), pybind11::arg("bias") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

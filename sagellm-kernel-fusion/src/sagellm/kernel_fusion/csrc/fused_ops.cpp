// Fused element-wise ops of a Llama decoder layer, one pass over memory each:
// RMSNorm (optionally after the residual addition), rotary embedding of q and k written
// straight into the paged KV cache, and SiLU(gate) * up. Arithmetic in float32; results
// rounded to the activation dtype once where the eager ops round after every op, so they
// agree with eager within that dtype's rounding.
//
// The KV write also stores quantized caches (int8, float8_e4m3fn, float8_e5m2; last dim
// D + 2): each token-head row becomes D values of x / scale and then its float16 scale
// amax(|x|) / qmax, bit-cast into the 2 trailing bytes (sagellm.engine.layers.kv_quant).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "vec_math.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SAGELLM_VEC_BF16 1
#endif

namespace sagellm {
namespace {

inline float f32(float x) { return x; }
inline float f32(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float f32(at::Half x) { return static_cast<float>(x); }

// rounding as the eager bf16 path does: norm -> dtype, then * weight -> dtype
template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t n, float eps,
              T* residual_out, const T* residual_in) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      float ss = 0.f;
      if (residual_in != nullptr) {
        const T* rr = residual_in + r * n;
        T* ro = residual_out + r * n;
        for (int64_t i = 0; i < n; ++i) {
          // the residual stream is kept in the activation dtype, as eager's add_ does
          const T s = round_to<T>(f32(xr[i]) + f32(rr[i]));
          ro[i] = s;
          buf[i] = f32(s);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = f32(xr[i]);
      }
      for (int64_t i = 0; i < n; ++i) ss += buf[i] * buf[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      T* o = out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        o[i] = round_to<T>(f32(round_to<T>(buf[i] * inv)) * f32(w[i]));
      }
    }
  });
}

#if defined(SAGELLM_VEC_BF16)
// bfloat16 rows, 16 lanes at a time, with the scalar path's roundings
template <>
void rms_rows<at::BFloat16>(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out,
                            int64_t rows, int64_t n, float eps, at::BFloat16* residual_out,
                            const at::BFloat16* residual_in) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* xr = x + r * n;
      const at::BFloat16* src = xr;
      __m512 ss = _mm512_setzero_ps();
      if (residual_in != nullptr) {
        const at::BFloat16* rr = residual_in + r * n;
        at::BFloat16* ro = residual_out + r * n;
        for (int64_t i = 0; i < n; i += 16) {
          const __mmask16 m = sagellm::first_lanes(n - i);
          const __m512 s = _mm512_add_ps(sagellm::load_bf16(xr + i, m),
                                         sagellm::load_bf16(rr + i, m));
          sagellm::store_bf16(ro + i, s, m);
          const __m512 sr = sagellm::through_bf16(s);
          ss = _mm512_fmadd_ps(sr, sr, ss);
        }
        src = ro;
      } else {
        for (int64_t i = 0; i < n; i += 16) {
          const __m512 v = sagellm::load_bf16(xr + i, sagellm::first_lanes(n - i));
          ss = _mm512_fmadd_ps(v, v, ss);
        }
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps);
      const __m512 vinv = _mm512_set1_ps(inv);
      at::BFloat16* o = out + r * n;
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = sagellm::first_lanes(n - i);
        const __m512 y = sagellm::through_bf16(_mm512_mul_ps(sagellm::load_bf16(src + i, m), vinv));
        sagellm::store_bf16(o + i, _mm512_mul_ps(y, sagellm::load_bf16(w + i, m)), m);
      }
    }
  });
}

// silu(gate) * up of bfloat16 rows; silu rounded to bfloat16 before the product, as eager
void silu_mul_rows_bf16(const at::BFloat16* x, at::BFloat16* out, int64_t rows, int64_t w) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* g = x + r * 2 * w;
      const at::BFloat16* u = g + w;
      at::BFloat16* o = out + r * w;
      for (int64_t i = 0; i < w; i += 16) {
        const __mmask16 m = sagellm::first_lanes(w - i);
        const __m512 gv = sagellm::load_bf16(g + i, m);
        const __m512 e = sagellm::exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 sv = sagellm::through_bf16(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
        sagellm::store_bf16(o + i, _mm512_mul_ps(sv, sagellm::load_bf16(u + i, m)), m);
      }
    }
  });
}
#endif

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, hidden] tensor");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "weight must be [hidden]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "x and weight must have one dtype");
}

#define SAGELLM_DISPATCH(DT, NAME, ...)                                               \
  switch (DT) {                                                                       \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }      \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }              \
    default: TORCH_CHECK(false, NAME " supports float32, bfloat16 and float16");     \
  }

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  auto out = at::empty_like(x);
  SAGELLM_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps),
                       nullptr, nullptr);
  });
  return out;
}

// returns (norm(x + residual), x + residual); x + residual is written into residual
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x, at::Tensor& residual,
                                     const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() &&
                  residual.scalar_type() == x.scalar_type(),
              "residual must be contiguous, with x's shape and dtype");
  auto out = at::empty_like(x);
  SAGELLM_DISPATCH(x.scalar_type(), "add_rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                       out.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps),
                       residual.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>());
  });
  return {out, residual};
}

namespace {

// a quantized cache element type: its largest magnitude and how a scaled value is stored
template <typename C>
struct KVQuant {
  static constexpr bool enabled = false;
};
template <>
struct KVQuant<int8_t> {
  static constexpr bool enabled = true;
  static constexpr float qmax = 127.f;
  // nearbyint rounds half to even, as torch.round does
  static int8_t encode(float y) { return static_cast<int8_t>(std::nearbyint(y)); }
};
template <>
struct KVQuant<c10::Float8_e4m3fn> {
  static constexpr bool enabled = true;
  static constexpr float qmax = 448.f;
  static c10::Float8_e4m3fn encode(float y) { return c10::Float8_e4m3fn(y); }
};
template <>
struct KVQuant<c10::Float8_e5m2> {
  static constexpr bool enabled = true;
  static constexpr float qmax = 57344.f;
  static c10::Float8_e5m2 encode(float y) { return c10::Float8_e5m2(y); }
};

// one token-head row of D values into D quantized elements and its float16 scale; the
// scale is at least float16's smallest normal, at most its largest
template <typename T, typename C>
inline void write_quantized_row(const T* x, C* dst, int64_t D) {
  using Q = KVQuant<C>;
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(f32(x[i])));
  const at::Half hs(std::min(std::max(amax / Q::qmax, 6.103515625e-05f), 65504.f));
  const float scale = static_cast<float>(hs);  // divide by the scale as stored
  for (int64_t i = 0; i < D; ++i) {
    const float y = std::min(std::max(f32(x[i]) / scale, -Q::qmax), Q::qmax);
    dst[i] = Q::encode(y);
  }
  std::memcpy(dst + D, &hs.x, sizeof(hs.x));
}

// qkv [T, (H + 2 Hkv) D]: rotates q and k heads in place (half-split layout) with the
// float32 cos/sin tables [max_pos, D/2] at `positions`, then copies k and v rows into the
// caches [blocks, block_size, Hkv, D] at `slots` (flat block * block_size + offset).
template <typename T, typename C>
void rotary_kv(T* qkv, int64_t T_, int64_t H, int64_t Hkv, int64_t D, const int64_t* pos,
               const float* cos, const float* sin, C* kc, C* vc, const int64_t* slots,
               int64_t kslot_stride, int64_t vslot_stride) {
  const int64_t half = D / 2, row = (H + 2 * Hkv) * D;
  at::parallel_for(0, T_, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* r = qkv + t * row;
      const float* c = cos + pos[t] * half;
      const float* s = sin + pos[t] * half;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        T* x = r + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = f32(x[i]), x2 = f32(x[i + half]);
          x[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          x[i + half] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
      if (kc != nullptr) {
        const T* k = r + H * D;
        const T* v = r + (H + Hkv) * D;
        C* kd = kc + slots[t] * kslot_stride;
        C* vd = vc + slots[t] * vslot_stride;
        if constexpr (KVQuant<C>::enabled) {
          for (int64_t h = 0; h < Hkv; ++h) {
            write_quantized_row(k + h * D, kd + h * (D + 2), D);
            write_quantized_row(v + h * D, vd + h * (D + 2), D);
          }
        } else {
          for (int64_t i = 0; i < Hkv * D; ++i) {
            kd[i] = static_cast<C>(f32(k[i]));
            vd[i] = static_cast<C>(f32(v[i]));
          }
        }
      }
    }
  });
}

}  // namespace

void rotary_write_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                     const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be a contiguous [T, width] tensor");
  const auto ct = k_cache.scalar_type();
  const bool quantized =
      ct == at::kChar || ct == at::kFloat8_e4m3fn || ct == at::kFloat8_e5m2;
  const int64_t row_len = k_cache.size(3);  // D, or D + 2 for a quantized row and its scale
  const int64_t D = quantized ? row_len - 2 : row_len;
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * D,
              "qkv width != (H + 2 Hkv) D (a quantized cache's rows hold D + 2)");
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slots.is_contiguous() &&
                  positions.size(0) == qkv.size(0) && slots.size(0) == qkv.size(0),
              "positions and slots must be contiguous int64 [T]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == D / 2,
              "cos and sin must be contiguous float32 [max_pos, head_dim / 2]");
  TORCH_CHECK(k_cache.size(2) == num_kv_heads && k_cache.stride(3) == 1 &&
                  k_cache.stride(2) == row_len &&
                  k_cache.stride(0) == k_cache.size(1) * k_cache.stride(1) &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "caches must be [blocks, block_size, Hkv, D] with contiguous blocks");
  const int64_t max_pos = cos.size(0);
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.size(0); ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < max_pos, "position ", pp[t], " outside the rotary table");
  const int64_t slot_stride = k_cache.stride(1);
  const auto qt = qkv.scalar_type();
#define SAGELLM_ROT(QT, CT, TQ, TC)                                                          \
  if (qt == QT && ct == CT) {                                                                \
    rotary_kv<TQ, TC>(qkv.data_ptr<TQ>(), qkv.size(0), num_heads, num_kv_heads, D, pp,       \
                      cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<TC>(), \
                      v_cache.data_ptr<TC>(), slots.data_ptr<int64_t>(), slot_stride,        \
                      slot_stride);                                                          \
    return;                                                                                  \
  }
  SAGELLM_ROT(at::kFloat, at::kFloat, float, float)
  SAGELLM_ROT(at::kBFloat16, at::kBFloat16, at::BFloat16, at::BFloat16)
  SAGELLM_ROT(at::kHalf, at::kHalf, at::Half, at::Half)
  SAGELLM_ROT(at::kFloat, at::kBFloat16, float, at::BFloat16)
  SAGELLM_ROT(at::kFloat, at::kHalf, float, at::Half)
  SAGELLM_ROT(at::kFloat, at::kChar, float, int8_t)
  SAGELLM_ROT(at::kBFloat16, at::kChar, at::BFloat16, int8_t)
  SAGELLM_ROT(at::kHalf, at::kChar, at::Half, int8_t)
  SAGELLM_ROT(at::kFloat, at::kFloat8_e4m3fn, float, c10::Float8_e4m3fn)
  SAGELLM_ROT(at::kBFloat16, at::kFloat8_e4m3fn, at::BFloat16, c10::Float8_e4m3fn)
  SAGELLM_ROT(at::kHalf, at::kFloat8_e4m3fn, at::Half, c10::Float8_e4m3fn)
  SAGELLM_ROT(at::kFloat, at::kFloat8_e5m2, float, c10::Float8_e5m2)
  SAGELLM_ROT(at::kBFloat16, at::kFloat8_e5m2, at::BFloat16, c10::Float8_e5m2)
  SAGELLM_ROT(at::kHalf, at::kFloat8_e5m2, at::Half, c10::Float8_e5m2)
#undef SAGELLM_ROT
  TORCH_CHECK(false, "rotary_write_kv: activations ", qt, " with caches ", ct, " not supported");
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "x must be a contiguous [rows, 2 * width] tensor (gate then up)");
  const int64_t rows = x.size(0), w = x.size(1) / 2;
  auto out = at::empty({rows, w}, x.options());
#if defined(SAGELLM_VEC_BF16)
  if (x.scalar_type() == at::kBFloat16) {
    silu_mul_rows_bf16(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, w);
    return out;
  }
#endif
  SAGELLM_DISPATCH(x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = xp + r * 2 * w;
        const scalar_t* u = g + w;
        scalar_t* o = op + r * w;
        for (int64_t i = 0; i < w; ++i) {
          const float gv = f32(g[i]);
          // eager rounds silu(gate) to the dtype before the multiplication
          const float sv = f32(round_to<scalar_t>(gv / (1.f + std::exp(-gv))));
          o[i] = static_cast<scalar_t>(sv * f32(u[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace sagellm

// whether rms_norm, add_rms_norm and silu_and_mul are vectorised for this dtype here (then
// they beat torch's separate ops at any row count; otherwise only on small steps)
bool fused_ops_vectorized(torch::ScalarType dtype) {
#if defined(SAGELLM_VEC_BF16)
  return dtype == at::kBFloat16;
#else
  (void)dtype;
  return false;
#endif
}

void register_fused_ops(pybind11::module& m) {
  m.def("fused_ops_vectorized", &fused_ops_vectorized,
        "whether the element-wise ops are vectorised for this dtype on this CPU");
  m.def("rms_norm", &sagellm::rms_norm, "RMSNorm over the last dim", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("add_rms_norm", &sagellm::add_rms_norm, "residual += x, then RMSNorm of it",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rotary_write_kv", &sagellm::rotary_write_kv,
        "rotate q and k in place, write k and v to the cache", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_and_mul", &sagellm::silu_and_mul, "silu(gate) * up", pybind11::call_guard<pybind11::gil_scoped_release>());
}

// The package's ops as C++ functions, for kernels that chain them without a round trip
// through Python (decode_step.cpp). Each is defined, and documented, in its own source.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sagellm {

// fused_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::vector<at::Tensor> add_rms_norm(const at::Tensor& x, at::Tensor& residual,
                                     const at::Tensor& weight, double eps);
void rotary_write_kv(at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                     const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                     at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots);
at::Tensor silu_and_mul(const at::Tensor& x);

// gguf_linear.cpp
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor d,
                          torch::Tensor c, int64_t bits, int64_t input_bits);

// int8_linear.cpp
std::vector<at::Tensor> quantize_per_row(const at::Tensor& x);
at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scales,
                       const at::Tensor& w_zero_points, const std::optional<at::Tensor>& bias);

// paged_attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale);

}  // namespace sagellm

// Every decoder layer of a decode step in one call. A Llama layer of a few decode rows is
// nine small ops (two norms, four projections on GGUF blocks, rotary + KV write, paged
// attention, SiLU * mul); dispatched one module call at a time from Python, the calls cost
// about as much as the products themselves at batch 1. A projection whose layer switches
// to a float product from some row count on (oneDNN's blocked weight, or a plain weight)
// switches at the same count here (or to its W8A8 int8 product), so batched decode steps
// run here too. DecodeStep holds each layer's
// weights once and runs the same ops back to back in C++, without the interpreter (and
// with the GIL released, so a server's event loop runs meanwhile). The ops are the
// package's own (kernels.h), called exactly as the engine's layers call them, so the
// result is bitwise the layer-by-layer one.
//
// Per layer l (x the normalised input, r the residual stream, both [T, E]):
//   x, r = add_rms_norm(h, r, input_norm)      (layer 0: r = h, x = rms_norm(h))
//   qkv  = x @ Wqkv (+ b);  rotate q, k in place, write k, v to their slots
//   h    = attention(q) @ Wo
//   x, r = add_rms_norm(h, r, post_norm)
//   h    = silu_and_mul(x @ Wgate_up) @ Wdown
// and the step returns (h, r) of the last layer; the final norm and the head stay with the
// caller.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace sagellm {
namespace {

// The dense product of a projection that has one: oneDNN's linear on the weight
// reordered into its blocked layout (what the layer's OneDNNLinear calls), through the
// dispatcher so that it is the very op the layer-by-layer path runs.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// How a projection multiplies from dense_min_rows rows on (the layer's dense method):
// oneDNN's float product, F.linear, or the W8A8 int8 product (int8_linear.cpp).
enum DenseKind : int64_t { kNoDense = 0, kOneDNN = 1, kLinear = 2, kInt8 = 3 };

// A projection's GGUF blocks in gguf_linear's layout, its optional bias, and the dense
// weight its layer switches to on steps of dense_min_rows rows or more (with its
// per-channel scales when that product is W8A8).
struct Projection {
  at::Tensor codes, d, c;
  std::optional<at::Tensor> bias;
  int64_t bits = 4;
  std::optional<at::Tensor> dense;
  int64_t dense_kind = kNoDense;
  int64_t dense_min_rows = std::numeric_limits<int64_t>::max();
  std::optional<at::Tensor> dense_scales;
  at::Tensor dense_zero_points;

  int64_t rows() const { return codes.size(0); }
  int64_t cols() const { return bits == 4 ? codes.size(1) * 2 : codes.size(1); }

  at::Tensor apply(const at::Tensor& x, int64_t input_bits) const {
    if (dense.has_value() && x.size(0) >= dense_min_rows) {
      if (dense_kind == kOneDNN) return onednn_linear(x, *dense, bias);
      if (dense_kind == kInt8) return w8a8_linear(x, *dense, *dense_scales, dense_zero_points, bias);
      return at::linear(x, *dense, bias);
    }
    at::Tensor y = gguf_linear(x, codes, d, c, bits, input_bits);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Projection qkv, o, gate_up, down;
  int64_t num_heads = 0;
};

// (codes, d, c, bits, bias, dense weight, dense kind, dense_min_rows, dense scales)
using ProjectionArgs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, std::optional<at::Tensor>,
               std::optional<at::Tensor>, int64_t, int64_t, std::optional<at::Tensor>>;

Projection make_projection(const ProjectionArgs& a, const char* name, int64_t layer) {
  Projection p{std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<4>(a),
               std::get<3>(a), std::get<5>(a), std::get<6>(a), std::get<7>(a),
               std::get<8>(a), at::Tensor()};
  TORCH_CHECK(p.bits == 4 || p.bits == 8, "layer ", layer, " ", name, ": bits must be 4 or 8");
  TORCH_CHECK(p.dense_kind >= kNoDense && p.dense_kind <= kInt8, "layer ", layer, " ", name,
              ": dense kind must be 0 (none), 1 (oneDNN), 2 (linear) or 3 (int8)");
  TORCH_CHECK(p.dense_scales.has_value() == (p.dense_kind == kInt8), "layer ", layer, " ", name,
              ": an int8 dense weight goes with its float32 scales [N] (and no other kind does)");
  if (p.dense_kind == kInt8) {
    TORCH_CHECK(p.dense_scales->dim() == 1 && p.dense_scales->size(0) == p.rows() &&
                    p.dense_scales->scalar_type() == at::kFloat,
                "layer ", layer, " ", name, ": int8 dense scales must be float32 [", p.rows(), "]");
    p.dense_zero_points = at::zeros({p.rows()}, p.dense_scales->options().dtype(at::kLong));
  }
  TORCH_CHECK(p.dense.has_value() == (p.dense_kind != kNoDense), "layer ", layer, " ", name,
              ": a dense weight goes with a dense kind (and none without)");
  TORCH_CHECK(!p.dense.has_value() || p.dense_min_rows >= 1, "layer ", layer, " ", name,
              ": dense_min_rows must be at least 1");
  if (p.dense_kind == kLinear) {
    TORCH_CHECK(p.dense->dim() == 2 && p.dense->size(0) == p.rows() &&
                    p.dense->size(1) == p.cols(),
                "layer ", layer, " ", name, ": the dense weight must be [", p.rows(), ", ",
                p.cols(), "]");
  }
  TORCH_CHECK(p.codes.dim() == 2 && p.d.dim() == 2 && p.d.size(0) == p.rows() &&
                  p.d.size(1) * 32 == p.cols(),
              "layer ", layer, " ", name, ": codes [N, K/2 or K] and scales [N, K/32] expected");
  if (p.bias.has_value()) {
    TORCH_CHECK(p.bias->dim() == 1 && p.bias->size(0) == p.rows(), "layer ", layer, " ", name,
                ": bias must be [", p.rows(), "]");
  }
  return p;
}

class DecodeStep {
 public:
  DecodeStep(int64_t num_kv_heads, int64_t head_dim, double eps, int64_t input_bits,
             double scale)
      : num_kv_heads_(num_kv_heads),
        head_dim_(head_dim),
        eps_(eps),
        input_bits_(input_bits),
        scale_(scale) {
    TORCH_CHECK(num_kv_heads > 0 && head_dim > 0 && head_dim % 2 == 0,
                "DecodeStep: num_kv_heads > 0 and an even head_dim expected");
    TORCH_CHECK(input_bits == 8 || input_bits == 16, "DecodeStep: input_bits must be 8 or 16");
  }

  // projections: qkv, o, gate_up, down, each (codes, d, c, bits, bias or None, dense
  // weight or None, dense kind, dense_min_rows, dense scales or None)
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, int64_t num_heads,
                 const std::vector<ProjectionArgs>& projections) {
    const int64_t l = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(projections.size() == 4, "layer ", l,
                ": four projections (qkv, o, gate_up, down) expected, got ", projections.size());
    Layer layer{input_norm,
                post_norm,
                make_projection(projections[0], "qkv", l),
                make_projection(projections[1], "o", l),
                make_projection(projections[2], "gate_up", l),
                make_projection(projections[3], "down", l),
                num_heads};
    const int64_t E = input_norm.numel(), D = head_dim_;
    TORCH_CHECK(num_heads > 0 && num_heads % num_kv_heads_ == 0, "layer ", l, ": ", num_heads,
                " query heads over ", num_kv_heads_, " KV heads");
    TORCH_CHECK(post_norm.numel() == E, "layer ", l, ": the two norms differ in size");
    TORCH_CHECK(layer.qkv.cols() == E && layer.qkv.rows() == (num_heads + 2 * num_kv_heads_) * D,
                "layer ", l, ": qkv is ", layer.qkv.rows(), "x", layer.qkv.cols(), ", expected ",
                (num_heads + 2 * num_kv_heads_) * D, "x", E);
    TORCH_CHECK(layer.o.cols() == num_heads * D && layer.o.rows() == E, "layer ", l,
                ": o is ", layer.o.rows(), "x", layer.o.cols(), ", expected ", E, "x",
                num_heads * D);
    TORCH_CHECK(layer.gate_up.cols() == E && layer.gate_up.rows() % 2 == 0 &&
                    layer.down.cols() * 2 == layer.gate_up.rows() && layer.down.rows() == E,
                "layer ", l, ": gate_up (", layer.gate_up.rows(), "x", layer.gate_up.cols(),
                ") and down (", layer.down.rows(), "x", layer.down.cols(), ") do not fit");
    TORCH_CHECK(layers_.empty() || E == layers_[0].input_norm.numel(), "layer ", l,
                ": hidden size ", E, " differs from layer 0's");
    layers_.push_back(std::move(layer));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // hidden [T, E] (the embeddings; T decode rows); positions, slots int64 [T];
  // k_caches, v_caches one per layer; block_tables int32 [T, width]; context_lens int32
  // [T]; cos, sin float32 [max_pos, D/2]. Returns (h, r) of the last layer.
  std::vector<at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& positions,
                                  const at::Tensor& slots, std::vector<at::Tensor> k_caches,
                                  std::vector<at::Tensor> v_caches,
                                  const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, const at::Tensor& cos,
                                  const at::Tensor& sin) const {
    TORCH_CHECK(!layers_.empty(), "DecodeStep.forward: no layers were added");
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == num_layers() &&
                    v_caches.size() == k_caches.size(),
                "DecodeStep.forward: one K and one V cache per layer (", num_layers(),
                ") expected, got ", k_caches.size(), " and ", v_caches.size());
    TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() &&
                    hidden.size(1) == layers_[0].input_norm.numel(),
                "DecodeStep.forward: hidden must be contiguous [T, ",
                layers_[0].input_norm.numel(), "]");
    const int64_t T = hidden.size(0), D = head_dim_;
    at::Tensor h = hidden, r;
    for (int64_t l = 0; l < num_layers(); ++l) {
      const Layer& L = layers_[l];
      at::Tensor x;
      if (l == 0) {
        r = h;
        x = rms_norm(h, L.input_norm, eps_);
      } else {
        auto xr = add_rms_norm(h, r, L.input_norm, eps_);
        x = xr[0];
      }
      at::Tensor qkv = L.qkv.apply(x, input_bits_);
      rotary_write_kv(qkv, positions, cos, sin, L.num_heads, num_kv_heads_, k_caches[l],
                      v_caches[l], slots);
      const at::Tensor q = qkv.narrow(1, 0, L.num_heads * D).view({T, L.num_heads, D});
      const at::Tensor attn = paged_decode_attention(q.contiguous(), k_caches[l], v_caches[l],
                                                     block_tables, context_lens, scale_);
      h = L.o.apply(attn.view({T, L.num_heads * D}), input_bits_);
      auto xr = add_rms_norm(h, r, L.post_norm, eps_);
      h = L.down.apply(silu_and_mul(L.gate_up.apply(xr[0], input_bits_)), input_bits_);
    }
    return {h, r};
  }

 private:
  std::vector<Layer> layers_;
  int64_t num_kv_heads_, head_dim_;
  double eps_;
  int64_t input_bits_;
  double scale_;
};

}  // namespace
}  // namespace sagellm

void register_decode_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<sagellm::DecodeStep>(m, "DecodeStep",
                                  "every decoder layer of a few-row decode step in one call")
      .def(py::init<int64_t, int64_t, double, int64_t, double>(), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("input_bits"), py::arg("scale"))
      .def("add_layer", &sagellm::DecodeStep::add_layer, py::arg("input_norm"),
           py::arg("post_norm"), py::arg("num_heads"), py::arg("projections"))
      .def_property_readonly("num_layers", &sagellm::DecodeStep::num_layers)
      .def("forward", &sagellm::DecodeStep::forward, py::arg("hidden"), py::arg("positions"),
           py::arg("slots"), py::arg("k_caches"), py::arg("v_caches"), py::arg("block_tables"),
           py::arg("context_lens"), py::arg("cos"), py::arg("sin"),
           py::call_guard<py::gil_scoped_release>());
}

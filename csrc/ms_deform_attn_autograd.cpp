// Autograd kernels of hybrid_detr::ms_deform_attn (as torchvision's csrc/ops/autograd).
#include "ms_deform_attn.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace hybrid_detr {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

class MSDeformAttnFunction : public torch::autograd::Function<MSDeformAttnFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& value,
      const Variable& spatial_shapes,
      const Variable& level_start_index,
      const Variable& sampling_locations,
      const Variable& attention_weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto grads = _ms_deform_attn_backward(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    return {std::get<0>(grads), Variable(), Variable(), std::get<1>(grads), std::get<2>(grads)};
  }
};

// The backward op itself is not differentiable (no double backward).
class MSDeformAttnBackwardFunction : public torch::autograd::Function<MSDeformAttnBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Variable& grad_output,
      const Variable& value,
      const Variable& spatial_shapes,
      const Variable& level_start_index,
      const Variable& sampling_locations,
      const Variable& attention_weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = _ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    TORCH_CHECK(false, "hybrid_detr::_ms_deform_attn_backward: double backward is not supported");
  }
};

at::Tensor ms_deform_attn_autograd(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  return MSDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_autograd(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  auto r = MSDeformAttnBackwardFunction::apply(
      grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return {r[0], r[1], r[2]};
}

} // namespace

TORCH_LIBRARY_IMPL(hybrid_detr, Autograd, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_autograd));
  m.impl("_ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_autograd));
}

} // namespace hybrid_detr

// Schema of the hybrid_detr ops, input validation and the dispatcher entry points.
// Device kernels: cpu/ms_deform_attn_cpu.cpp, cuda/ms_deform_attn_cuda.cu; autograd:
// ms_deform_attn_autograd.cpp; fake (meta) kernels: hybrid_detr/layers/ms_deform_attn_func.py.
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace hybrid_detr {

namespace {
std::string shape_str(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}
} // namespace

MSDeformAttnSizes check_ms_deform_attn_inputs(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  // Ranks.
  TORCH_CHECK(value.dim() == 4, op, ": value must be (N, S, M, D), got shape ", shape_str(value));
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be (L, 2) holding (H, W) per level, got shape ", shape_str(spatial_shapes));
  TORCH_CHECK(level_start_index.dim() == 1, op, ": level_start_index must be (L,), got shape ",
              shape_str(level_start_index));
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2, op,
              ": sampling_locations must be (N, Lq, M, L, P, 2), got shape ", shape_str(sampling_locations));
  TORCH_CHECK(attention_weights.dim() == 5, op, ": attention_weights must be (N, Lq, M, L, P), got shape ",
              shape_str(attention_weights));

  // Dtypes.
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, op, ": spatial_shapes must be int64 (torch.long), got ",
              spatial_shapes.scalar_type(), "; convert it with .long()");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, op,
              ": level_start_index must be int64 (torch.long), got ", level_start_index.scalar_type(),
              "; convert it with .long()");
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), op, ": value must be a floating-point tensor, got ",
              value.scalar_type());
  // Mixed precision: a float16 / bfloat16 value (sampled in its own dtype, accumulated in float32)
  // may come with float32 locations and weights, as autocast produces them; locations need float32
  // precision on large levels.
  const auto coords = sampling_locations.scalar_type();
  const bool half_value = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  TORCH_CHECK(coords == value.scalar_type() || (half_value && coords == at::kFloat), op,
              ": sampling_locations must have the dtype of value (", value.scalar_type(), ")",
              half_value ? " or float32" : "", ", got ", coords);
  TORCH_CHECK(attention_weights.scalar_type() == coords, op,
              ": attention_weights must have the dtype of sampling_locations (", coords, "), got ",
              attention_weights.scalar_type());

  // Devices.
  const auto dev = value.device();
  TORCH_CHECK(spatial_shapes.device() == dev, op, ": spatial_shapes is on ", spatial_shapes.device(),
              " but value is on ", dev, "; all inputs must be on the same device");
  TORCH_CHECK(level_start_index.device() == dev, op, ": level_start_index is on ", level_start_index.device(),
              " but value is on ", dev, "; all inputs must be on the same device");
  TORCH_CHECK(sampling_locations.device() == dev, op, ": sampling_locations is on ", sampling_locations.device(),
              " but value is on ", dev, "; all inputs must be on the same device");
  TORCH_CHECK(attention_weights.device() == dev, op, ": attention_weights is on ", attention_weights.device(),
              " but value is on ", dev, "; all inputs must be on the same device");

  MSDeformAttnSizes s;
  s.N = value.size(0);
  s.S = value.size(1);
  s.M = value.size(2);
  s.D = value.size(3);
  s.Lq = sampling_locations.size(1);
  s.L = sampling_locations.size(3);
  s.P = sampling_locations.size(4);

  // Shapes consistent with each other.
  TORCH_CHECK(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M, op,
              ": sampling_locations (N, Lq, M, L, P, 2) = ", shape_str(sampling_locations),
              " does not match value (N, S, M, D) = ", shape_str(value), " in N or M");
  TORCH_CHECK(spatial_shapes.size(0) == s.L, op, ": spatial_shapes has ", spatial_shapes.size(0),
              " levels but sampling_locations has L = ", s.L);
  TORCH_CHECK(level_start_index.size(0) == s.L, op, ": level_start_index has ", level_start_index.size(0),
              " entries but there are L = ", s.L, " levels");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), op,
              ": attention_weights must be (N, Lq, M, L, P) = ", sampling_locations.sizes().slice(0, 5),
              ", got ", shape_str(attention_weights));
  if (grad_output.defined()) {
    TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), op, ": grad_output must have the dtype of value (",
                value.scalar_type(), "), got ", grad_output.scalar_type());
    TORCH_CHECK(grad_output.device() == dev, op, ": grad_output is on ", grad_output.device(),
                " but value is on ", dev);
    TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.N && grad_output.size(1) == s.Lq &&
                    grad_output.size(2) == s.M * s.D,
                op, ": grad_output must be (N, Lq, M*D) = (", s.N, ", ", s.Lq, ", ", s.M * s.D, "), got ",
                shape_str(grad_output));
  }

  if (dev.is_cpu() || std::getenv("HYBRID_DETR_SYNC_CHECKS") != nullptr) {
    // The CPU kernels need the sizes on the host anyway (free on a CPU tensor); on a GPU this copy
    // synchronises, so it is taken there only when asked for its precise message.
    check_level_layout_on_host(op, spatial_shapes.to(at::kCPU).contiguous(), level_start_index.to(at::kCPU).contiguous(),
                               s);
  } else {
    // The CUDA kernels read the layout from device memory: check it there, without a device-to-host sync.
    check_level_layout(spatial_shapes, level_start_index, s.S);
  }
  return s;
}

void check_level_layout_on_host(const char* op, const at::Tensor& shapes_cpu, const at::Tensor& starts_cpu,
                                MSDeformAttnSizes& s) {
  const int64_t* hw = shapes_cpu.const_data_ptr<int64_t>();
  const int64_t* st = starts_cpu.const_data_ptr<int64_t>();
  s.H.resize(s.L);
  s.W.resize(s.L);
  s.start.resize(s.L);
  int64_t total = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t h = hw[2 * l], w = hw[2 * l + 1];
    TORCH_CHECK(h >= 0 && w >= 0, op, ": spatial_shapes[", l, "] = (", h, ", ", w, ") must not be negative");
    TORCH_CHECK(st[l] == total, op, ": level_start_index[", l, "] = ", st[l],
                " is inconsistent with spatial_shapes (expected ", total, ", the sum of H*W of the levels before)");
    s.H[l] = h;
    s.W[l] = w;
    s.start[l] = total;
    total += h * w;
  }
  TORCH_CHECK(total == s.S, op, ": the sum over levels of H*W from spatial_shapes is ", total,
              " but value has S = ", s.S, " keys");
}

void check_level_layout(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_keys) {
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && level_start_index.dim() == 1 &&
                  level_start_index.size(0) == spatial_shapes.size(0),
              "check_level_layout: spatial_shapes must be (L, 2) and level_start_index (L,), got ",
              shape_str(spatial_shapes), " and ", shape_str(level_start_index));
  if (spatial_shapes.size(0) == 0) {
    TORCH_CHECK(num_keys == 0, "ms_deform_attn: no levels in spatial_shapes but value has S = ", num_keys, " keys");
    return;
  }
  const auto areas = spatial_shapes.select(1, 0) * spatial_shapes.select(1, 1);
  const auto ends = areas.cumsum(0);
  const auto consistent = spatial_shapes.ge(0).all()
                              .logical_and(level_start_index.eq(ends - areas).all())
                              .logical_and(ends.select(0, -1).eq(num_keys));
  // Raises at once on the CPU; on a GPU a device-side assertion, in stream order before the kernel.
  // HYBRID_DETR_SYNC_CHECKS=1 gives the host check's precise message instead.
  at::_assert_async(consistent,
                    "ms_deform_attn: spatial_shapes / level_start_index / value are inconsistent (negative H or W, "
                    "level_start_index not the exclusive cumsum of H*W, or sum of H*W != S); "
                    "rerun with HYBRID_DETR_SYNC_CHECKS=1 for which one");
}

bool cuda_backward_deterministic() {
  auto& ctx = at::globalContext();
  const char* force = std::getenv("HYBRID_DETR_CUDA_BACKWARD");
  const bool force_atomic = force != nullptr && std::strcmp(force, "atomic") == 0;
  if (ctx.deterministicAlgorithms() && !force_atomic) {
    return true;
  }
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  return false;
}

at::Tensor ms_deform_attn(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hybrid_detr::ms_deform_attn", "")
                       .typed<decltype(ms_deform_attn)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _ms_deform_attn_backward(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hybrid_detr::_ms_deform_attn_backward", "")
                       .typed<decltype(_ms_deform_attn_backward)>();
  return op.call(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

TORCH_LIBRARY(hybrid_detr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
  // The CUDA backward's choice, as an op so that CPU tests see its alert as Python errors/warnings.
  m.def("_cuda_backward_deterministic() -> bool", &cuda_backward_deterministic);
  // The level-layout check the CUDA path runs on the device (no sync), as an op so CPU tests can run it.
  m.def("_check_level_layout(Tensor spatial_shapes, Tensor level_start_index, int num_keys) -> ()",
        &check_level_layout);
}

} // namespace hybrid_detr

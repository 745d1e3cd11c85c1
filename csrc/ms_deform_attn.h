// Multi-scale deformable attention (Deformable DETR): shared declarations.
//
//   value                (N, S, M, D)          S = sum_l H_l * W_l
//   spatial_shapes       (L, 2) int64          (H_l, W_l)
//   level_start_index    (L,) int64
//   sampling_locations   (N, Lq, M, L, P, 2)   (x, y) in [0, 1]; outside is zero padding
//   attention_weights    (N, Lq, M, L, P)
//   output               (N, Lq, M * D)
// Bilinear sampling at pixel coordinates (x * W - 0.5, y * H - 0.5), zero padding: the same as
// grid_sample(..., align_corners=False) on 2 * loc - 1.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace hybrid_detr {

struct MSDeformAttnSizes {
  int64_t N, S, M, D, Lq, L, P;
  // Host copies of spatial_shapes and level_start_index: filled for CPU tensors only (the CPU
  // kernels need them); the CUDA kernels read them from device memory.
  std::vector<int64_t> H, W, start;
};

// Validates the inputs (shapes, dtypes, devices and the level layout) and returns the sizes.
// `grad_output` may be undefined (forward). The level layout (spatial_shapes, level_start_index
// against S) is checked on the host for CPU tensors, and on the device for GPU tensors (no
// device-to-host synchronisation; HYBRID_DETR_SYNC_CHECKS=1 checks on the host there too).
MSDeformAttnSizes check_ms_deform_attn_inputs(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output = at::Tensor());

// Fills s.H / s.W / s.start from host copies of the layout, checking it with a precise message.
void check_level_layout_on_host(const char* op, const at::Tensor& shapes_cpu, const at::Tensor& starts_cpu,
                                MSDeformAttnSizes& s);

// The same check with tensor ops on the layout's own device: raises at once on the CPU, a device-side
// assertion (in stream order, no synchronisation) on a GPU.
void check_level_layout(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_keys);

// The CPU kernel variant in use: "baseline", "avx2" or "avx512" (cpu/ms_deform_attn_cpu.cpp).
const char* cpu_kernel_isa();
// The CPU kernel variants compiled in, e.g. "baseline,avx2,avx512".
const char* cpu_kernel_variants();
// How many threads an at::parallel_for of the CPU kernels runs on now (torch.set_num_threads); 1 when the
// library was built without OpenMP, where ATen's header-only parallel_for runs serially.
int64_t cpu_parallel_threads();

// Whether the CUDA backward takes its deterministic path (no float atomics on grad_value): when
// torch.use_deterministic_algorithms(True) is on, unless HYBRID_DETR_CUDA_BACKWARD=atomic forces
// the atomic one, which then alerts (error, or warning with warn_only=True) as ATen ops do.
// Host code, also registered as the op hybrid_detr::_cuda_backward_deterministic so CPU tests can
// check the choice and its alert.
bool cuda_backward_deterministic();

// Dispatcher entry points (what torch.ops.hybrid_detr.* call).
at::Tensor ms_deform_attn(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> _ms_deform_attn_backward(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

} // namespace hybrid_detr

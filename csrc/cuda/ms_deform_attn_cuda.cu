// CUDA kernels of hybrid_detr::ms_deform_attn and its backward (float32/64, float16, bfloat16;
// half types accumulate in float32). Same sampling logic as cpu/ms_deform_attn_cpu.cpp.
//
// One warp per output row (n, q, m): the lanes run over the D channels of the value rows, so
// loads are coalesced and the (location, weight) of each sampling point is a warp-wide broadcast.
// Backward: grad_value by atomicAdd (into a float32 buffer for half types); the gradients of each
// sampling point's location and weight are reduced over channels with warp shuffles and written
// by lane 0 (one writer per point, no atomics). All offsets are 64-bit; no batch-size restriction.
#include "../ms_deform_attn.h"
#include "../ms_deform_attn_bilinear.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace hybrid_detr {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loop beyond this

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_forward_kernel(
    const Sizes s,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ value,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = s.N * s.Lq * s.M;
  const int64_t row_stride = s.M * s.D;  // between keys in value
  // The row index is the same for all lanes of a warp, so every branch below is warp-uniform.
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; r < rows;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t m = r % s.M;
    const int64_t n = r / (s.M * s.Lq);
    const scalar_t* value_nm = value + n * s.S * row_stride + m * s.D;
    const int64_t sample0 = r * s.L * s.P;
    for (int64_t d0 = 0; d0 < s.D; d0 += kWarp) {
      const int64_t d = d0 + lane;
      acc_t acc = 0;
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
        const scalar_t* level = value_nm + level_start_index[l] * row_stride;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t i = sample0 + l * s.P + p;
          Bilinear<acc_t> b;
          if (!bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b)) {
            continue;
          }
          if (d < s.D) {
            const acc_t a = static_cast<acc_t>(attn[i]);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (b.offset[c] >= 0) {
                acc += a * b.weight[c] * static_cast<acc_t>(level[b.offset[c] * row_stride + d]);
              }
            }
          }
        }
      }
      if (d < s.D) {
        out[r * s.D + d] = static_cast<scalar_t>(acc);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_backward_kernel(
    const Sizes s,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ value,
    const scalar_t* __restrict__ loc,
    const scalar_t* __restrict__ attn,
    at::opmath_type<scalar_t>* __restrict__ grad_value,
    scalar_t* __restrict__ grad_loc,
    scalar_t* __restrict__ grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = s.N * s.Lq * s.M;
  const int64_t row_stride = s.M * s.D;
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp; r < rows;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t m = r % s.M;
    const int64_t n = r / (s.M * s.Lq);
    const int64_t value_offset = n * s.S * row_stride + m * s.D;
    const scalar_t* go = grad_out + r * s.D;
    const int64_t sample0 = r * s.L * s.P;
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
      const int64_t level_offset = value_offset + level_start_index[l] * row_stride;
      const scalar_t* level = value + level_offset;
      acc_t* grad_level = grad_value + level_offset;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t i = sample0 + l * s.P + p;
        Bilinear<acc_t> b;
        if (!bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b)) {
          continue;  // gradients stay zero (buffers are zero-initialised)
        }
        const acc_t a = static_cast<acc_t>(attn[i]);
        acc_t dot[4] = {0, 0, 0, 0};  // <grad_out, corner value>, this lane's channels
        for (int64_t d = lane; d < s.D; d += kWarp) {
          const acc_t g = static_cast<acc_t>(go[d]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (b.offset[c] >= 0) {
              const int64_t idx = b.offset[c] * row_stride + d;
              dot[c] += g * static_cast<acc_t>(level[idx]);
              atomicAdd(grad_level + idx, a * b.weight[c] * g);
            }
          }
        }
        const acc_t fx = b.fx, fy = b.fy;
        acc_t g_attn = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] + b.weight[3] * dot[3];
        acc_t g_x = (1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]);
        acc_t g_y = (1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]);
        g_attn = warp_sum(g_attn);
        g_x = warp_sum(g_x);
        g_y = warp_sum(g_y);
        if (lane == 0) {
          grad_attn[i] = static_cast<scalar_t>(g_attn);
          grad_loc[2 * i] = static_cast<scalar_t>(a * g_x * static_cast<acc_t>(W));
          grad_loc[2 * i + 1] = static_cast<scalar_t>(a * g_y * static_cast<acc_t>(H));
        }
      }
    }
  }
}

Sizes to_sizes(const MSDeformAttnSizes& s) {
  return Sizes{s.N, s.S, s.M, s.D, s.Lq, s.L, s.P};
}

int64_t num_blocks(const MSDeformAttnSizes& s) {
  const int64_t rows = s.N * s.Lq * s.M;
  return std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks);
}

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs("ms_deform_attn", value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn: CUDA kernel called with ", value.device(), " tensors");
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::zeros({s.N, s.Lq, s.M * s.D}, value.options());
  if (out.numel() == 0 || s.L * s.P == 0) {
    return out;
  }
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    ms_deform_attn_forward_kernel<scalar_t><<<num_blocks(s), kThreads, 0, stream>>>(
        to_sizes(s), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        v.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs("_ms_deform_attn_backward", value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights, grad_output);
  TORCH_CHECK(value.is_cuda(), "_ms_deform_attn_backward: CUDA kernel called with ", value.device(), " tensors");
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_attn = at::zeros(attention_weights.sizes(), attention_weights.options());
  if (s.N * s.Lq * s.M * s.L * s.P != 0 && value.numel() != 0) {
    const auto go = grad_output.contiguous();
    const auto v = value.contiguous();
    const auto loc = sampling_locations.contiguous();
    const auto attn = attention_weights.contiguous();
    const auto shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          ms_deform_attn_backward_kernel<scalar_t><<<num_blocks(s), kThreads, 0, stream>>>(
              to_sizes(s), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
              go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
              attn.const_data_ptr<scalar_t>(), grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(),
              grad_loc.mutable_data_ptr<scalar_t>(), grad_attn.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  if (grad_value.scalar_type() != value.scalar_type()) {
    grad_value = grad_value.to(value.scalar_type());
  }
  return {grad_value, grad_loc, grad_attn};
}

} // namespace

TORCH_LIBRARY_IMPL(hybrid_detr, CUDA, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_forward_cuda));
  m.impl("_ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_cuda));
}

} // namespace hybrid_detr

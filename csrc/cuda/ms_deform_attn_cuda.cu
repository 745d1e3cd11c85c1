// CUDA kernels of hybrid_detr::ms_deform_attn and its backward (float32/64, float16, bfloat16;
// half types accumulate in float32, and take float32 locations and weights as autocast gives
// them). The per-sample arithmetic (pixel coordinate, bilinear
// corners and weights, the gradients of a sample) is ms_deform_attn_bilinear.h, the code the CPU
// kernels and tests run; this file holds only thread-index decoding, loops and accumulation.
//
// A group of `lanes` threads per output row (n, q, m) runs over the D channels of the value rows,
// so loads are coalesced; lanes = D rounded up to a power of two, at most 32, so with small D
// (16 at 128 channels / 8 heads) a warp packs several rows instead of idling half its lanes.
// Backward: grad_value by atomicAdd (into a float32 buffer for half types); each sampling
// point's location and weight gradients are reduced over the group with shuffles and written by
// its first lane (one writer per point). With torch.use_deterministic_algorithms(True),
// grad_value is built without float atomics instead: per (query chunk, n, m, level) slices owned
// by one thread group each, then summed over the chunks in a fixed order.
// All offsets are 64-bit; no batch-size restriction.
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
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Backward: at least 3 blocks of 256 threads per SM, i.e. at most 85 registers a thread (it used
// ~90 without a bound). Not measured: no GPU was available when this was written.
constexpr int kBackwardMinBlocks = 3;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loop beyond this

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
  int lanes;  // threads per row: a power of two, <= kWarp
};

// Sum over the `lanes` threads of a row group (xor partners stay inside the aligned group).
// Every thread of the warp must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int lanes) {
  for (int o = lanes / 2; o > 0; o /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Thread -> (row group within the warp, lane within the group).
struct Lane {
  int sub, lane, rows_per_warp;
  __device__ explicit Lane(int lanes) {
    const int l = threadIdx.x % kWarp;
    sub = l / lanes;
    lane = l % lanes;
    rows_per_warp = kWarp / lanes;
  }
};

__device__ __forceinline__ int64_t first_warp() {
  return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
}
__device__ __forceinline__ int64_t warp_stride() {
  return int64_t(gridDim.x) * kWarpsPerBlock;
}

// scalar_t: value, output and their gradients; coord_t: sampling locations, attention weights and
// their gradients (scalar_t, or float32 for a half-type value).
template <typename scalar_t, typename coord_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_forward_kernel(
    const Sizes s,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ value,
    const coord_t* __restrict__ loc,
    const coord_t* __restrict__ attn,
    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Lane t(s.lanes);
  const int64_t rows = s.N * s.Lq * s.M;
  const int64_t row_stride = s.M * s.D;  // between keys in value
  for (int64_t w = first_warp(); w * t.rows_per_warp < rows; w += warp_stride()) {
    const int64_t r = w * t.rows_per_warp + t.sub;
    if (r >= rows) {
      continue;  // no shuffles in the forward: groups may diverge
    }
    const int64_t m = r % s.M;
    const int64_t n = r / (s.M * s.Lq);
    const scalar_t* value_nm = value + n * s.S * row_stride + m * s.D;
    const int64_t sample0 = r * s.L * s.P;
    for (int64_t d0 = 0; d0 < s.D; d0 += s.lanes) {
      const int64_t d = d0 + t.lane;
      acc_t acc = 0;
      for (int64_t l = 0; l < s.L; ++l) {
        const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
        const scalar_t* level = value_nm + level_start_index[l] * row_stride;
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t i = sample0 + l * s.P + p;
          Bilinear<acc_t> b;
          if (d >= s.D ||
              !bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b)) {
            continue;
          }
          const acc_t a = static_cast<acc_t>(attn[i]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (b.offset[c] >= 0) {
              acc += corner_coeff(b, a, c) * static_cast<acc_t>(level[b.offset[c] * row_stride + d]);
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

// Gradients of the sampling locations and attention weights (each point written once), and, when
// kValueGrad, grad_value by atomics.
template <typename scalar_t, typename coord_t, bool kValueGrad>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks) ms_deform_attn_backward_kernel(
    const Sizes s,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ value,
    const coord_t* __restrict__ loc,
    const coord_t* __restrict__ attn,
    at::opmath_type<scalar_t>* __restrict__ grad_value,
    coord_t* __restrict__ grad_loc,
    coord_t* __restrict__ grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const Lane t(s.lanes);
  const int64_t rows = s.N * s.Lq * s.M;
  const int64_t row_stride = s.M * s.D;
  // The loop bound is the same for the whole warp; a group past the end works on the last row
  // without writing, so that every lane takes part in the shuffles.
  for (int64_t w = first_warp(); w * t.rows_per_warp < rows; w += warp_stride()) {
    const int64_t r_own = w * t.rows_per_warp + t.sub;
    const bool active = r_own < rows;
    const int64_t r = active ? r_own : rows - 1;
    const int64_t m = r % s.M;
    const int64_t n = r / (s.M * s.Lq);
    const int64_t value_offset = n * s.S * row_stride + m * s.D;
    const scalar_t* go = grad_out + r * s.D;
    const int64_t sample0 = r * s.L * s.P;
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
      const int64_t level_offset = value_offset + level_start_index[l] * row_stride;
      const scalar_t* level = value + level_offset;
      acc_t* grad_level = kValueGrad ? grad_value + level_offset : nullptr;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t i = sample0 + l * s.P + p;
        Bilinear<acc_t> b;
        const bool valid =
            bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b);
        const acc_t a = static_cast<acc_t>(attn[i]);
        SampleGrads<acc_t> g{0, 0, 0};
        if (valid) {
          acc_t dot[4] = {0, 0, 0, 0};  // <grad_out, corner value> over this lane's channels
          for (int64_t d = t.lane; d < s.D; d += s.lanes) {
            const acc_t go_d = static_cast<acc_t>(go[d]);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (b.offset[c] >= 0) {
                const int64_t idx = b.offset[c] * row_stride + d;
                dot[c] += go_d * static_cast<acc_t>(level[idx]);
                if (kValueGrad && active) {
                  atomicAdd(grad_level + idx, corner_coeff(b, a, c) * go_d);
                }
              }
            }
          }
          g = sample_grads_partial(b, dot);  // linear in dot: partial sums add up
        }
        g.attn = group_sum(g.attn, s.lanes);
        g.x = group_sum(g.x, s.lanes);
        g.y = group_sum(g.y, s.lanes);
        if (active && t.lane == 0) {
          acc_t gx = 0, gy = 0;
          if (valid) {
            sample_grads_finish(g, a, H, W, gx, gy);
          }
          grad_attn[i] = static_cast<coord_t>(g.attn);
          grad_loc[2 * i] = static_cast<coord_t>(gx);
          grad_loc[2 * i + 1] = static_cast<coord_t>(gy);
        }
      }
    }
  }
}

// Deterministic grad_value: a task (chunk, n, m, level) adds the samples of queries
// [chunk * Lq / chunks, (chunk + 1) * Lq / chunks) into partial[chunk] (slice n, level, m, :),
// in query order, one thread per channel: no two threads touch the same element.
template <typename scalar_t, typename coord_t>
__global__ void __launch_bounds__(kThreads) ms_deform_attn_value_grad_slices_kernel(
    const Sizes s,
    const int64_t chunks,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ grad_out,
    const coord_t* __restrict__ loc,
    const coord_t* __restrict__ attn,
    at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const Lane t(s.lanes);
  const int64_t per_chunk = s.N * s.M * s.L;
  const int64_t tasks = chunks * per_chunk;
  const int64_t row_stride = s.M * s.D;
  const int64_t numel = s.N * s.S * row_stride;
  for (int64_t w = first_warp(); w * t.rows_per_warp < tasks; w += warp_stride()) {
    const int64_t task = w * t.rows_per_warp + t.sub;
    if (task >= tasks) {
      continue;
    }
    const int64_t l = task % s.L;
    const int64_t m = (task / s.L) % s.M;
    const int64_t n = (task / (s.L * s.M)) % s.N;
    const int64_t chunk = task / per_chunk;
    const int64_t H = spatial_shapes[2 * l], W = spatial_shapes[2 * l + 1];
    acc_t* grad_level = partial + chunk * numel + (n * s.S + level_start_index[l]) * row_stride + m * s.D;
    const int64_t q_end = (chunk + 1) * s.Lq / chunks;
    for (int64_t q = chunk * s.Lq / chunks; q < q_end; ++q) {
      const int64_t r = (n * s.Lq + q) * s.M + m;
      const scalar_t* go = grad_out + r * s.D;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t i = (r * s.L + l) * s.P + p;
        Bilinear<acc_t> b;
        if (!bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn[i]);
        for (int64_t d = t.lane; d < s.D; d += s.lanes) {
          const acc_t go_d = static_cast<acc_t>(go[d]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (b.offset[c] >= 0) {
              grad_level[b.offset[c] * row_stride + d] += corner_coeff(b, a, c) * go_d;
            }
          }
        }
      }
    }
  }
}

// out[j] = sum over c of partial[c * numel + j], c in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_chunks_kernel(
    const acc_t* __restrict__ partial, int64_t chunks, int64_t numel, acc_t* __restrict__ out) {
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < numel; j += int64_t(gridDim.x) * kThreads) {
    acc_t sum = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      sum += partial[c * numel + j];
    }
    out[j] = sum;
  }
}

Sizes to_sizes(const MSDeformAttnSizes& s) {
  int lanes = 1;
  while (lanes < s.D && lanes < kWarp) {
    lanes *= 2;
  }
  return Sizes{s.N, s.S, s.M, s.D, s.Lq, s.L, s.P, lanes};
}

int64_t num_blocks(int64_t items, int lanes) {
  const int64_t per_block = int64_t(kWarpsPerBlock) * (kWarp / lanes);
  return std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, kMaxBlocks));
}

// Query chunks of the deterministic grad_value: enough thread groups to fill a GPU, at most
// ~1 GiB of partial sums.
int64_t value_grad_chunks(const Sizes& s, int64_t numel, size_t acc_size) {
  const int64_t tasks = std::max<int64_t>(1, s.N * s.M * s.L);
  const int64_t want = (int64_t(32768) / (kWarp / s.lanes) + tasks - 1) / tasks;
  const int64_t by_memory = (int64_t(1) << 30) / std::max<int64_t>(1, numel * int64_t(acc_size));
  return std::max<int64_t>(1, std::min({want, s.Lq, int64_t(64), by_memory}));
}

// The tensors of one call, contiguous, and the stream.
struct Launch {
  Sizes sz;
  at::Tensor shapes, starts, grad_out, value, loc, attn;
  cudaStream_t stream;
};

template <typename scalar_t, typename coord_t>
void launch_forward(const Launch& a, at::Tensor& out) {
  const int64_t rows = a.sz.N * a.sz.Lq * a.sz.M;
  ms_deform_attn_forward_kernel<scalar_t, coord_t><<<num_blocks(rows, a.sz.lanes), kThreads, 0, a.stream>>>(
      a.sz, a.shapes.const_data_ptr<int64_t>(), a.starts.const_data_ptr<int64_t>(),
      a.value.const_data_ptr<scalar_t>(), a.loc.const_data_ptr<coord_t>(), a.attn.const_data_ptr<coord_t>(),
      out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns grad_value in the accumulation type; writes grad_loc and grad_attn.
template <typename scalar_t, typename coord_t>
at::Tensor launch_backward(const Launch& a, bool deterministic, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::TensorOptions acc_options = a.value.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t rows = a.sz.N * a.sz.Lq * a.sz.M;
  const int64_t* shapes = a.shapes.const_data_ptr<int64_t>();
  const int64_t* starts = a.starts.const_data_ptr<int64_t>();
  const scalar_t* go = a.grad_out.const_data_ptr<scalar_t>();
  const coord_t* loc = a.loc.const_data_ptr<coord_t>();
  const coord_t* attn = a.attn.const_data_ptr<coord_t>();
  if (!deterministic) {
    at::Tensor grad_value = at::zeros(a.value.sizes(), acc_options);
    ms_deform_attn_backward_kernel<scalar_t, coord_t, true><<<num_blocks(rows, a.sz.lanes), kThreads, 0, a.stream>>>(
        a.sz, shapes, starts, go, a.value.const_data_ptr<scalar_t>(), loc, attn, grad_value.mutable_data_ptr<acc_t>(),
        grad_loc.mutable_data_ptr<coord_t>(), grad_attn.mutable_data_ptr<coord_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return grad_value;
  }
  ms_deform_attn_backward_kernel<scalar_t, coord_t, false><<<num_blocks(rows, a.sz.lanes), kThreads, 0, a.stream>>>(
      a.sz, shapes, starts, go, a.value.const_data_ptr<scalar_t>(), loc, attn, nullptr,
      grad_loc.mutable_data_ptr<coord_t>(), grad_attn.mutable_data_ptr<coord_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t numel = a.value.numel();
  const int64_t chunks = value_grad_chunks(a.sz, numel, sizeof(acc_t));
  at::Tensor partial = at::zeros({chunks, numel}, acc_options);
  ms_deform_attn_value_grad_slices_kernel<scalar_t, coord_t>
      <<<num_blocks(chunks * a.sz.N * a.sz.M * a.sz.L, a.sz.lanes), kThreads, 0, a.stream>>>(
          a.sz, chunks, shapes, starts, go, loc, attn, partial.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks == 1) {
    return partial.view(a.value.sizes());
  }
  at::Tensor grad_value = at::empty(a.value.sizes(), acc_options);
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks);
  sum_chunks_kernel<acc_t><<<blocks, kThreads, 0, a.stream>>>(partial.const_data_ptr<acc_t>(), chunks, numel,
                                                               grad_value.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_value;
}

Launch make_launch(const MSDeformAttnSizes& s, const at::Tensor& grad_output, const at::Tensor& value,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  return Launch{to_sizes(s),
                spatial_shapes.contiguous(),
                level_start_index.contiguous(),
                grad_output.defined() ? grad_output.contiguous() : grad_output,
                value.contiguous(),
                sampling_locations.contiguous(),
                attention_weights.contiguous(),
                c10::cuda::getCurrentCUDAStream()};
}

// Locations and weights in the value's dtype, or float32 with a half-type value (validated by
// check_ms_deform_attn_inputs).
bool same_coords(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return sampling_locations.scalar_type() == value.scalar_type();
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
  auto out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());  // the kernel writes every element
  if (out.numel() == 0) {
    return out;
  }
  const Launch a = make_launch(s, at::Tensor(), value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  const bool same = same_coords(value, sampling_locations);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    if (same) {
      launch_forward<scalar_t, scalar_t>(a, out);
    } else {
      launch_forward<scalar_t, at::opmath_type<scalar_t>>(a, out);
    }
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
  const bool work = s.N * s.Lq * s.M * s.L * s.P != 0 && value.numel() != 0;
  // Alerts (torch.use_deterministic_algorithms) when the atomic path is taken.
  const bool deterministic = work && cuda_backward_deterministic();
  // grad_loc / grad_attn: the kernel writes every element.
  auto grad_loc = work ? at::empty(sampling_locations.sizes(), sampling_locations.options())
                       : at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_attn = work ? at::empty(attention_weights.sizes(), attention_weights.options())
                        : at::zeros(attention_weights.sizes(), attention_weights.options());
  if (!work) {
    return {at::zeros(value.sizes(), value.options()), grad_loc, grad_attn};
  }
  const Launch a = make_launch(s, grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  const bool same = same_coords(value, sampling_locations);
  at::Tensor grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    grad_value = same ? launch_backward<scalar_t, scalar_t>(a, deterministic, grad_loc, grad_attn)
                      : launch_backward<scalar_t, at::opmath_type<scalar_t>>(a, deterministic, grad_loc, grad_attn);
  });
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

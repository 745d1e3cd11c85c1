// CPU kernels of hybrid_detr::ms_deform_attn and its backward.
//
// Forward: parallel over (batch, query); each output row (N, Lq, M, :) is owned by one thread.
// Backward: parallel over (batch, head, level); grad_value rows of one (n, m, level) form a slice
// that no other task touches, so there are no data races and no atomics; grad_locations and
// grad_attention_weights of each sample are written by the task owning its (n, m, level).
// The inner loops run over the D channels of a value row (contiguous) and are written in blocks
// of a fixed width that the compiler turns into SIMD code.
#include "../ms_deform_attn.h"
#include "../ms_deform_attn_bilinear.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace hybrid_detr {
namespace {

// Block width of the channel loops: one 256-bit register of accumulators.
template <typename acc_t>
constexpr int64_t kBlock = 32 / sizeof(acc_t);

// acc[d] += sum_c w[c] * v_c[d]
template <typename scalar_t, typename acc_t>
inline void axpy4(acc_t* __restrict__ acc,
                  const scalar_t* __restrict__ v0, const scalar_t* __restrict__ v1,
                  const scalar_t* __restrict__ v2, const scalar_t* __restrict__ v3,
                  const acc_t w0, const acc_t w1, const acc_t w2, const acc_t w3, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) +
              w2 * static_cast<acc_t>(v2[d]) + w3 * static_cast<acc_t>(v3[d]);
  }
}

// dot[c] = <go, v_c>;  g_c[d] += k[c] * go[d]
template <typename scalar_t, typename acc_t>
inline void backward_row(const acc_t* __restrict__ go,
                         const scalar_t* __restrict__ v0, const scalar_t* __restrict__ v1,
                         const scalar_t* __restrict__ v2, const scalar_t* __restrict__ v3,
                         acc_t* __restrict__ g0, acc_t* __restrict__ g1,
                         acc_t* __restrict__ g2, acc_t* __restrict__ g3,
                         const acc_t k0, const acc_t k1, const acc_t k2, const acc_t k3,
                         int64_t D, acc_t dot[4]) {
  constexpr int64_t K = kBlock<acc_t>;
  acc_t s0[K] = {}, s1[K] = {}, s2[K] = {}, s3[K] = {};
  int64_t d = 0;
  for (; d + K <= D; d += K) {
    for (int64_t k = 0; k < K; ++k) {
      const acc_t g = go[d + k];
      s0[k] += g * static_cast<acc_t>(v0[d + k]);
      s1[k] += g * static_cast<acc_t>(v1[d + k]);
      s2[k] += g * static_cast<acc_t>(v2[d + k]);
      s3[k] += g * static_cast<acc_t>(v3[d + k]);
      g0[d + k] += k0 * g;
      g1[d + k] += k1 * g;
      g2[d + k] += k2 * g;
      g3[d + k] += k3 * g;
    }
  }
  acc_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; d < D; ++d) {
    const acc_t g = go[d];
    t0 += g * static_cast<acc_t>(v0[d]);
    t1 += g * static_cast<acc_t>(v1[d]);
    t2 += g * static_cast<acc_t>(v2[d]);
    t3 += g * static_cast<acc_t>(v3[d]);
    g0[d] += k0 * g;
    g1[d] += k1 * g;
    g2[d] += k2 * g;
    g3[d] += k3 * g;
  }
  for (int64_t k = 0; k < K; ++k) {
    t0 += s0[k];
    t1 += s1[k];
    t2 += s2[k];
    t3 += s3[k];
  }
  dot[0] = t0;
  dot[1] = t1;
  dot[2] = t2;
  dot[3] = t3;
}

template <typename scalar_t>
void forward_kernel(const MSDeformAttnSizes& s, const scalar_t* value, const scalar_t* loc,
                    const scalar_t* attn, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = s.M, D = s.D, L = s.L, P = s.P, S = s.S, Lq = s.Lq;
  const int64_t row = M * D;  // stride between keys in value
  const int64_t work_per_item = std::max<int64_t>(1, M * L * P * D);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_item);
  at::parallel_for(0, s.N * Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    Bilinear<acc_t> b;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / Lq;
      const scalar_t* value_n = value + n * S * row;
      for (int64_t m = 0; m < M; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t sample0 = (nq * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = s.H[l], W = s.W[l];
          const scalar_t* level = value_n + s.start[l] * row + m * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = sample0 + l * P + p;
            if (!bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b)) {
              continue;
            }
            const acc_t a = static_cast<acc_t>(attn[i]);
            const scalar_t* v[4];
            for (int c = 0; c < 4; ++c) {
              v[c] = b.offset[c] >= 0 ? level + b.offset[c] * row : zeros.data();
            }
            axpy4<scalar_t, acc_t>(acc.data(), v[0], v[1], v[2], v[3], a * b.weight[0], a * b.weight[1],
                                   a * b.weight[2], a * b.weight[3], D);
          }
        }
        scalar_t* o = out + (nq * M + m) * D;
        for (int64_t d = 0; d < D; ++d) {
          o[d] = static_cast<scalar_t>(acc[d]);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const MSDeformAttnSizes& s, const scalar_t* grad_out, const scalar_t* value,
                     const scalar_t* loc, const scalar_t* attn,
                     at::opmath_type<scalar_t>* grad_value, scalar_t* grad_loc, scalar_t* grad_attn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = s.M, D = s.D, L = s.L, P = s.P, S = s.S, Lq = s.Lq;
  const int64_t row = M * D;
  // Tasks (n, m, l): grad_value[n, start_l : start_l + H_l*W_l, m, :] belongs to one task.
  at::parallel_for(0, s.N * M * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(D);
    const std::vector<scalar_t> zeros(D, scalar_t(0));
    std::vector<acc_t> sink(4 * D);  // where the gradient of out-of-level corners goes
    Bilinear<acc_t> b;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % L;
      const int64_t m = (task / L) % M;
      const int64_t n = task / (L * M);
      const int64_t H = s.H[l], W = s.W[l];
      const int64_t level_offset = (n * S + s.start[l]) * row + m * D;
      const scalar_t* level = value + level_offset;
      acc_t* grad_level = grad_value + level_offset;
      for (int64_t q = 0; q < Lq; ++q) {
        const int64_t nq = n * Lq + q;
        const scalar_t* go_row = grad_out + (nq * M + m) * D;
        bool loaded = false;
        const int64_t sample0 = ((nq * M + m) * L + l) * P;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = sample0 + p;
          if (!bilinear<acc_t>(static_cast<acc_t>(loc[2 * i]), static_cast<acc_t>(loc[2 * i + 1]), H, W, b)) {
            continue;  // gradients stay zero
          }
          if (!loaded) {
            for (int64_t d = 0; d < D; ++d) {
              go[d] = static_cast<acc_t>(go_row[d]);
            }
            loaded = true;
          }
          const acc_t a = static_cast<acc_t>(attn[i]);
          const scalar_t* v[4];
          acc_t* g[4];
          for (int c = 0; c < 4; ++c) {
            const bool inside = b.offset[c] >= 0;
            v[c] = inside ? level + b.offset[c] * row : zeros.data();
            g[c] = inside ? grad_level + b.offset[c] * row : sink.data() + c * D;
          }
          acc_t dot[4];
          backward_row<scalar_t, acc_t>(go.data(), v[0], v[1], v[2], v[3], g[0], g[1], g[2], g[3],
                                        a * b.weight[0], a * b.weight[1], a * b.weight[2], a * b.weight[3],
                                        D, dot);
          const acc_t fx = b.fx, fy = b.fy;
          grad_attn[i] = static_cast<scalar_t>(b.weight[0] * dot[0] + b.weight[1] * dot[1] +
                                               b.weight[2] * dot[2] + b.weight[3] * dot[3]);
          // d(sample)/dx_pixel and d/dy_pixel; x_pixel = loc_x * W - 0.5.
          const acc_t dx = (1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]);
          const acc_t dy = (1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]);
          grad_loc[2 * i] = static_cast<scalar_t>(a * dx * static_cast<acc_t>(W));
          grad_loc[2 * i + 1] = static_cast<scalar_t>(a * dy * static_cast<acc_t>(H));
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs("ms_deform_attn", value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights);
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: CPU kernel called with ", value.device(), " tensors");
  auto out = at::zeros({s.N, s.Lq, s.M * s.D}, value.options());
  if (out.numel() == 0) {
    return out;
  }
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(s, v.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
                             attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs("_ms_deform_attn_backward", value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights, grad_output);
  TORCH_CHECK(value.device().is_cpu(), "_ms_deform_attn_backward: CPU kernel called with ", value.device(),
              " tensors");
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_attn = at::zeros(attention_weights.sizes(), attention_weights.options());
  if (s.N * s.Lq * s.M * s.L * s.P != 0 && value.numel() != 0) {
    const auto go = grad_output.contiguous();
    const auto v = value.contiguous();
    const auto loc = sampling_locations.contiguous();
    const auto attn = attention_weights.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          backward_kernel<scalar_t>(s, go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                    loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
                                    grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                                    grad_loc.mutable_data_ptr<scalar_t>(), grad_attn.mutable_data_ptr<scalar_t>());
        });
  }
  if (grad_value.scalar_type() != value.scalar_type()) {
    grad_value = grad_value.to(value.scalar_type());
  }
  return {grad_value, grad_loc, grad_attn};
}

} // namespace

TORCH_LIBRARY_IMPL(hybrid_detr, CPU, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_forward_cpu));
  m.impl("_ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_cpu));
}

} // namespace hybrid_detr

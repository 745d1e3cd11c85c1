// CPU entry points of hybrid_detr::ms_deform_attn and its backward: validation, allocation,
// threading (at::parallel_for) and the choice of the kernel variant for this CPU. The kernels are
// in isa/ms_deform_attn_cpu_isa.cpp (one source, compiled for the baseline, AVX2 and AVX-512).
//
// Forward: parallel over chunks of (batch, query); each output row (n, q, :) is owned by one thread.
// Backward: parallel over (batch, head, level); grad_value rows of one (n, m, level) form a slice
// that no other task touches, so there are no data races and no atomics, and the result does not
// depend on the number of threads.
#include "../ms_deform_attn.h"
#include "ms_deform_attn_cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

namespace hybrid_detr {

namespace {

// at::get_cpu_capability() is what ATen's own kernels use: the best this CPU supports, or the
// lower one ATEN_CPU_CAPABILITY asks for (read once, as ATen does).
const cpu::Kernels& select_kernels() {
  static const cpu::Kernels* chosen = [] {
    const std::string cap = at::get_cpu_capability();
    (void)cap;
#ifdef HYBRID_DETR_CPU_AVX512
    if (cap == "AVX512") {
      return &cpu::avx512::kernels();
    }
#endif
#ifdef HYBRID_DETR_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") {
      return &cpu::avx2::kernels();
    }
#endif
    return &cpu::baseline::kernels();
  }();
  return *chosen;
}

// f(begin, end) over [0, n) in chunks of `chunk`, handed out one at a time to the threads of one
// at::parallel_for: a thread slowed down (other processes on a shared machine) takes fewer chunks
// instead of holding everyone up, as a static split would. Each chunk is still computed by one
// thread in a fixed order, so results do not depend on the scheduling.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const auto work = [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) {
      f(c * chunk, std::min(n, (c + 1) * chunk));
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, workers, 1, work);  // one call per thread (or one serial call when nested)
}

cpu::Problem to_problem(const MSDeformAttnSizes& s) {
  return cpu::Problem{s.N, s.S, s.M, s.D, s.Lq, s.L, s.P, s.H.data(), s.W.data(), s.start.data()};
}

// Kernel element types from the value's and the coordinates' dtypes (validated before: equal, or
// float32 coordinates for a half-type value); half is computed in float by the callers below.
int kernel_dtype(at::ScalarType value, at::ScalarType coords) {
  cpu::DType t = cpu::DType::Float;
  switch (value) {
    case at::kFloat: t = cpu::DType::Float; break;
    case at::kDouble: t = cpu::DType::Double; break;
    case at::kBFloat16: t = coords == at::kBFloat16 ? cpu::DType::BFloat16 : cpu::DType::BFloat16Mixed; break;
    default: TORCH_CHECK(false, "ms_deform_attn: no CPU kernel for ", value);
  }
  return static_cast<int>(t);
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
  if (value.scalar_type() == at::kHalf) {  // no half kernel: computed in float32
    return ms_deform_attn_forward_cpu(value.to(at::kFloat), spatial_shapes, level_start_index,
                                      sampling_locations.to(at::kFloat), attention_weights.to(at::kFloat))
        .to(at::kHalf);
  }
  auto out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());  // every row is written
  if (out.numel() == 0) {
    return out;
  }
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const auto zeros = at::zeros({s.D}, value.options());
  const auto fn = select_kernels().forward[kernel_dtype(value.scalar_type(), loc.scalar_type())];
  const auto p = to_problem(s);
  const int64_t work_per_row = std::max<int64_t>(1, s.M * s.L * s.P * s.D);
  const int64_t chunk = std::max<int64_t>(1, 131072 / work_per_row);  // 32 rows at the encoder's sizes
  parallel_chunks(s.N * s.Lq, chunk, [&](int64_t begin, int64_t end) {
    fn(p, v.const_data_ptr(), loc.const_data_ptr(), attn.const_data_ptr(), out.mutable_data_ptr(),
       zeros.const_data_ptr(), begin, end);
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
  if (value.scalar_type() == at::kHalf) {
    auto g = ms_deform_attn_backward_cpu(grad_output.to(at::kFloat), value.to(at::kFloat), spatial_shapes,
                                         level_start_index, sampling_locations.to(at::kFloat),
                                         attention_weights.to(at::kFloat));
    return {std::get<0>(g).to(at::kHalf), std::get<1>(g).to(sampling_locations.scalar_type()),
            std::get<2>(g).to(attention_weights.scalar_type())};
  }
  // The kernel writes every element of grad_loc and grad_attn, and of grad_value for bfloat16
  // (from a per-task float accumulator: no float32 copy of it); float and double accumulate in
  // place, so their grad_value starts from zeros.
  const bool work = s.N * s.Lq * s.M * s.L * s.P != 0 && value.numel() != 0;
  const auto alloc = [work](const at::Tensor& like) {
    return work ? at::empty(like.sizes(), like.options()) : at::zeros(like.sizes(), like.options());
  };
  auto grad_value = value.scalar_type() == at::kBFloat16 ? alloc(value) : at::zeros(value.sizes(), value.options());
  auto grad_loc = alloc(sampling_locations);
  auto grad_attn = alloc(attention_weights);
  if (work) {
    const auto go = grad_output.contiguous();
    const auto v = value.contiguous();
    const auto loc = sampling_locations.contiguous();
    const auto attn = attention_weights.contiguous();
    const auto zeros = at::zeros({s.D}, value.options());
    const auto fn = select_kernels().backward[kernel_dtype(value.scalar_type(), loc.scalar_type())];
    const auto p = to_problem(s);
    // One task is a whole (n, m, level) slice.
    parallel_chunks(s.N * s.M * s.L, 1, [&](int64_t begin, int64_t end) {
      fn(p, go.const_data_ptr(), v.const_data_ptr(), loc.const_data_ptr(), attn.const_data_ptr(),
         grad_value.mutable_data_ptr(), grad_loc.mutable_data_ptr(), grad_attn.mutable_data_ptr(),
         zeros.const_data_ptr(), begin, end);
    });
  }
  return {grad_value, grad_loc, grad_attn};
}

} // namespace

const char* cpu_kernel_isa() {
  return select_kernels().isa;
}

int64_t cpu_parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<int> used(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { used[at::get_thread_num() % n] = 1; });
  return std::count(used.begin(), used.end(), 1);
}

const char* cpu_kernel_variants() {
  return "baseline"
#ifdef HYBRID_DETR_CPU_AVX2
         ",avx2"
#endif
#ifdef HYBRID_DETR_CPU_AVX512
         ",avx512"
#endif
      ;
}

TORCH_LIBRARY_IMPL(hybrid_detr, CPU, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_forward_cpu));
  m.impl("_ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_cpu));
}

} // namespace hybrid_detr

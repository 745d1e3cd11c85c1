// Interface between the CPU dispatch (ms_deform_attn_cpu.cpp, baseline flags) and the CPU kernels
// (isa/ms_deform_attn_cpu_isa.cpp, compiled once per instruction set: baseline, AVX2, AVX-512).
// Plain C++ only: the ISA translation units include no torch header (see ms_deform_attn_bilinear.h).
#pragma once

#include <cstdint>

namespace hybrid_detr {
namespace cpu {

struct Problem {
  int64_t N, S, M, D, Lq, L, P;
  const int64_t* H;      // (L,) level heights
  const int64_t* W;      // (L,) level widths
  const int64_t* start;  // (L,) first key of each level
};

// Element types of the kernels. bfloat16 is passed as its bits (uint16_t) and accumulates in
// float; grad_value is always accumulated in the accumulation type (float for bfloat16).
// BFloat16Mixed: value, output and their gradients in bfloat16, sampling locations, attention
// weights and their gradients in float32 (what autocast hands the op).
enum class DType { Float, Double, BFloat16, BFloat16Mixed };
constexpr int kNumDTypes = 4;

// Forward over the output rows nq in [begin, end) of N * Lq. `zeros` points to D zeros of the
// element type (the value row of corners outside a level).
using ForwardFn = void (*)(const Problem& p, const void* value, const void* loc, const void* attn, void* out,
                           const void* zeros, int64_t begin, int64_t end);

// Backward over the tasks t in [begin, end) of N * M * L, t = (n * M + m) * L + l: the task owns
// grad_value[n, level l, m, :], so tasks never write the same element. grad_value (element type)
// must be zero-filled for Float and Double (accumulated in place); for BFloat16 every element is
// written. Every element of grad_loc and grad_attn is written.
using BackwardFn = void (*)(const Problem& p, const void* grad_out, const void* value, const void* loc,
                            const void* attn, void* grad_value, void* grad_loc, void* grad_attn, const void* zeros,
                            int64_t begin, int64_t end);

struct Kernels {
  const char* isa;
  ForwardFn forward[kNumDTypes];    // by DType
  BackwardFn backward[kNumDTypes];  // by DType
};

namespace baseline {
const Kernels& kernels();
}
namespace avx2 {
const Kernels& kernels();
}
namespace avx512 {
const Kernels& kernels();
}

} // namespace cpu
} // namespace hybrid_detr

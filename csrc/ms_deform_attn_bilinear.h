// The per-sample arithmetic of ms_deform_attn, shared by the CPU kernels (every ISA variant) and
// the CUDA kernels, so the code that the CPU tests run is the code the GPU runs: the pixel
// coordinate, the bilinear corners and weights, and the gradients of one sample with respect to
// its value corners, its location and its attention weight. The kernels keep only the loops over
// channels, the thread/task decoding and the accumulation (atomics on the GPU).
//
// No torch headers: the CPU ISA variants include this with -mavx2 / -mavx512* and must not emit
// out-of-line copies of torch's inline functions. Everything here has internal linkage (an
// unnamed namespace) for the same reason: a variant's copy never replaces the baseline's at link.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HYBRID_DETR_HD __host__ __device__ __forceinline__
#else
#define HYBRID_DETR_HD inline
#endif

namespace hybrid_detr {
namespace {

HYBRID_DETR_HD float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

HYBRID_DETR_HD double fused_multiply_add(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

HYBRID_DETR_HD float floor_(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}

HYBRID_DETR_HD double floor_(double x) {
#if defined(__CUDA_ARCH__)
  return ::floor(x);
#else
  return std::floor(x);
#endif
}

// Pixel coordinate of a normalised location, as grid_sample(align_corners=False): loc * size - 0.5.
// One rounding (an explicit fma) on every device: nvcc would contract a*b-c into an fma by itself
// while a CPU compiler may or may not, and at pixel centres the two roundings pick different
// one-sided location gradients.
template <typename acc_t>
HYBRID_DETR_HD acc_t pixel_coord(acc_t loc, int64_t size) {
  return fused_multiply_add(loc, static_cast<acc_t>(size), acc_t(-0.5));
}

// One bilinear sample: up to four corners of a level, each a row offset (y * W + x) or -1 when the
// corner lies outside the level (zero padding), and its bilinear weight.
template <typename acc_t>
struct Bilinear {
  int64_t offset[4];  // corners (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  acc_t weight[4];
  acc_t fx, fy;       // fractional parts, for the gradient wrt the location
};

// Returns false when the sample contributes nothing and has zero gradients. A sample at exactly
// x = -1 (or y = -1) is kept: its value is 0 but, as in grid_sample, its location gradient is
// the right-sided one through the corner at 0. At x = W both corners are outside: gradient 0.
template <typename acc_t>
HYBRID_DETR_HD bool bilinear(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W, Bilinear<acc_t>& b) {
  const acc_t x = pixel_coord(loc_x, W);
  const acc_t y = pixel_coord(loc_y, H);
  if (!(x >= acc_t(-1) && y >= acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) {
    return false;  // also catches NaN
  }
  const acc_t xf = floor_(x), yf = floor_(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  const acc_t fx = x - xf, fy = y - yf;
  b.fx = fx;
  b.fy = fy;
  const bool vx0 = x0 >= 0, vx1 = x1 < W, vy0 = y0 >= 0, vy1 = y1 < H;
  b.offset[0] = (vy0 && vx0) ? y0 * W + x0 : -1;
  b.offset[1] = (vy0 && vx1) ? y0 * W + x1 : -1;
  b.offset[2] = (vy1 && vx0) ? y1 * W + x0 : -1;
  b.offset[3] = (vy1 && vx1) ? y1 * W + x1 : -1;
  b.weight[0] = (1 - fy) * (1 - fx);
  b.weight[1] = (1 - fy) * fx;
  b.weight[2] = fy * (1 - fx);
  b.weight[3] = fy * fx;
  return true;
}

// The coefficient of corner c in the output (forward) and of grad_output in grad_value[corner c]
// (backward): attention weight times bilinear weight.
template <typename acc_t>
HYBRID_DETR_HD acc_t corner_coeff(const Bilinear<acc_t>& b, acc_t attn, int c) {
  return attn * b.weight[c];
}

// Gradients of one sample from dot[c] = <grad_output row, value at corner c> (summed over the
// channels; corners outside the level have dot 0). All three are linear in dot, so a kernel may
// sum per-thread partial results of sample_grads_partial over the channels and finish with
// sample_grads_finish.
template <typename acc_t>
struct SampleGrads {
  acc_t attn;  // d out / d attention weight, dotted with grad_output
  acc_t x, y;  // d out / d pixel coordinate, not yet scaled by attn * (W, H)
};

// dot_t may also be a vector of per-channel-lane partial dots (the CPU kernels).
template <typename acc_t, typename dot_t = acc_t>
HYBRID_DETR_HD SampleGrads<dot_t> sample_grads_partial(const Bilinear<acc_t>& b, const dot_t dot[4]) {
  SampleGrads<dot_t> g;
  g.attn = b.weight[0] * dot[0] + b.weight[1] * dot[1] + b.weight[2] * dot[2] + b.weight[3] * dot[3];
  g.x = (1 - b.fy) * (dot[1] - dot[0]) + b.fy * (dot[3] - dot[2]);
  g.y = (1 - b.fx) * (dot[2] - dot[0]) + b.fx * (dot[3] - dot[1]);
  return g;
}

// d loc_x = attn * d x_pixel * W (x_pixel = loc_x * W - 0.5), likewise y.
template <typename acc_t>
HYBRID_DETR_HD void sample_grads_finish(const SampleGrads<acc_t>& g, acc_t attn, int64_t H, int64_t W,
                                        acc_t& grad_loc_x, acc_t& grad_loc_y) {
  grad_loc_x = attn * g.x * static_cast<acc_t>(W);
  grad_loc_y = attn * g.y * static_cast<acc_t>(H);
}

} // namespace
} // namespace hybrid_detr

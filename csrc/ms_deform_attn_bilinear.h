// The bilinear sampling step shared by the CPU and CUDA kernels of ms_deform_attn.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace hybrid_detr {

// One bilinear sample: up to four corners of a level, each a row offset (y * W + x) or -1 when the
// corner lies outside the level (zero padding), and its bilinear weight.
template <typename acc_t>
struct Bilinear {
  int64_t offset[4];  // corners (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  acc_t weight[4];
  acc_t fx, fy;       // fractional parts, for the gradient wrt the location
};

// Pixel coordinates follow grid_sample(align_corners=False): x = loc_x * W - 0.5.
// Returns false when no corner can contribute.
template <typename acc_t>
C10_HOST_DEVICE inline bool bilinear(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W, Bilinear<acc_t>& b) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) && y < static_cast<acc_t>(H))) {
    return false;  // also catches NaN
  }
#ifdef __CUDA_ARCH__
  const acc_t xf = ::floor(x), yf = ::floor(y);
#else
  const acc_t xf = std::floor(x), yf = std::floor(y);
#endif
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

} // namespace hybrid_detr

// CPU kernels of hybrid_detr::ms_deform_attn and its backward, vectorised over the D channels of a
// value row. setup.py compiles this one file once per instruction set, with its own flags and
// HYBRID_DETR_CPU_ISA = 0 (x86-64 / any baseline), 1 (-mavx2 -mfma) or 2 (-mavx512{f,bw,vl,dq});
// ms_deform_attn_cpu.cpp picks one at run time from at::get_cpu_capability(), as ATen does.
//
// Each variant lives in its own namespace and includes no torch header, so no inline function
// compiled with wider instructions can be merged into the baseline code at link time.
//
// Forward: per output row (n, q, m) the bilinear corners of all L * P samples are computed first
// (scalar code shared with CUDA), then the channels are accumulated in registers, a few vectors
// at a time. Backward: a task (n, m, level) owns its slice of grad_value (no races, no atomics,
// a fixed order: deterministic); per sample one pass over the channels gives both the four dot
// products <grad_out, corner value> and the grad_value updates.
#include "../ms_deform_attn_cpu_kernels.h"
#include "../../ms_deform_attn_bilinear.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if !(defined(__GNUC__) || defined(__clang__))
#error "the CPU kernels of ms_deform_attn use GCC/Clang vector extensions"
#endif

#ifndef HYBRID_DETR_CPU_ISA
#define HYBRID_DETR_CPU_ISA 0
#endif

#if HYBRID_DETR_CPU_ISA == 2
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__FMA__)
#error "HYBRID_DETR_CPU_ISA=2 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"
#endif
#define HYBRID_DETR_CPU_NS avx512
#define HYBRID_DETR_VEC_BYTES 64
#elif HYBRID_DETR_CPU_ISA == 1
#if !defined(__AVX2__) || !defined(__FMA__)
#error "HYBRID_DETR_CPU_ISA=1 needs -mavx2 -mfma"
#endif
#define HYBRID_DETR_CPU_NS avx2
#define HYBRID_DETR_VEC_BYTES 32
#else
#define HYBRID_DETR_CPU_NS baseline
#define HYBRID_DETR_VEC_BYTES 16
#endif

#define HYBRID_DETR_STR2(x) #x
#define HYBRID_DETR_STR(x) HYBRID_DETR_STR2(x)

namespace hybrid_detr {
namespace cpu {
namespace HYBRID_DETR_CPU_NS {
namespace {

constexpr int kVecBytes = HYBRID_DETR_VEC_BYTES;

struct BF16 {
  uint16_t bits;
};

typedef float VF __attribute__((vector_size(HYBRID_DETR_VEC_BYTES)));
typedef double VD __attribute__((vector_size(HYBRID_DETR_VEC_BYTES)));
typedef uint32_t VU32 __attribute__((vector_size(HYBRID_DETR_VEC_BYTES)));
typedef uint16_t VU16 __attribute__((vector_size(HYBRID_DETR_VEC_BYTES / 2)));

template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  using type = VF;
  static constexpr int lanes = kVecBytes / 4;
};
template <>
struct Vec<double> {
  using type = VD;
  static constexpr int lanes = kVecBytes / 8;
};

template <typename scalar_t>
struct AccOf {
  using type = scalar_t;
};
template <>
struct AccOf<BF16> {
  using type = float;
};

// --- scalar element access (accumulation type in registers) ---
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(BF16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename scalar_t>
inline scalar_t from_acc(typename AccOf<scalar_t>::type x) {
  return x;
}
// Round to nearest even, NaN to a quiet NaN (as c10::BFloat16).
template <>
inline BF16 from_acc<BF16>(float x) {
  if (x != x) {
    return BF16{0x7fc0};
  }
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return BF16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// --- vector access: Vec<acc>::lanes elements ---
inline VF vload(const float* p) {
  VF r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline VD vload(const double* p) {
  VD r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline VF vload(const BF16* p) {
  VU16 h;
  std::memcpy(&h, p, sizeof h);
  const VU32 u = __builtin_convertvector(h, VU32) << 16;
  VF r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}
inline void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(double* p, VD v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(BF16* p, VF v) {
  VU32 u;
  std::memcpy(&u, &v, sizeof u);
  const VU32 nan = reinterpret_cast<VU32>(v != v);
  const VU32 r = (((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) & ~nan) | (nan & 0x7fc0u);
  const VU16 h = __builtin_convertvector(r, VU16);
  std::memcpy(p, &h, sizeof h);
}

// Start the loads of a row's cache lines (at most 4): the corner rows of all the samples of an
// output row are requested while their weights are computed, before the channel loops use them.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * int64_t(sizeof(scalar_t));
  for (int64_t o = 0; o < bytes && o < 256; o += 64) {
    __builtin_prefetch(p + o);
  }
}

// --- forward ---
template <typename scalar_t, typename acc_t>
struct Entry {
  const scalar_t* v[4];  // corner value rows (a row of zeros outside the level)
  acc_t c[4];            // attention weight x bilinear weight
};

// out[d : d + NV * lanes] = sum over entries of sum_c c * v_c[d : ...]
template <int NV, typename scalar_t, typename acc_t>
inline void forward_block(const Entry<scalar_t, acc_t>* e, int64_t count, int64_t d, scalar_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int VW = Vec<acc_t>::lanes;
  V acc[NV];
  for (int k = 0; k < NV; ++k) {
    acc[k] = V{};
  }
  for (int64_t i = 0; i < count; ++i) {
    const V c0 = V{} + e[i].c[0], c1 = V{} + e[i].c[1], c2 = V{} + e[i].c[2], c3 = V{} + e[i].c[3];
    for (int k = 0; k < NV; ++k) {
      const int64_t o = d + k * VW;
      acc[k] += c0 * vload(e[i].v[0] + o) + c1 * vload(e[i].v[1] + o) + c2 * vload(e[i].v[2] + o) +
                c3 * vload(e[i].v[3] + o);
    }
  }
  for (int k = 0; k < NV; ++k) {
    vstore(out + d + k * VW, acc[k]);
  }
}

template <typename scalar_t, typename acc_t>
inline void forward_channels(const Entry<scalar_t, acc_t>* e, int64_t count, int64_t D, scalar_t* out) {
  constexpr int VW = Vec<acc_t>::lanes;
  int64_t d = 0;
  for (; d + 4 * VW <= D; d += 4 * VW) {
    forward_block<4>(e, count, d, out);
  }
  switch ((D - d) / VW) {
    case 3: forward_block<3>(e, count, d, out); d += 3 * VW; break;
    case 2: forward_block<2>(e, count, d, out); d += 2 * VW; break;
    case 1: forward_block<1>(e, count, d, out); d += VW; break;
    default: break;
  }
  for (; d < D; ++d) {  // fewer than one vector left
    acc_t acc = 0;
    for (int64_t i = 0; i < count; ++i) {
      acc += e[i].c[0] * to_acc(e[i].v[0][d]) + e[i].c[1] * to_acc(e[i].v[1][d]) +
             e[i].c[2] * to_acc(e[i].v[2][d]) + e[i].c[3] * to_acc(e[i].v[3][d]);
    }
    out[d] = from_acc<scalar_t>(acc);
  }
}

// scalar_t: value and output; coord_t: sampling locations and attention weights (scalar_t, or
// float for a bfloat16 value under autocast).
template <typename scalar_t, typename coord_t>
void forward(const Problem& p, const void* value_, const void* loc_, const void* attn_, void* out_,
             const void* zeros_, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* value = static_cast<const scalar_t*>(value_);
  const auto* loc = static_cast<const coord_t*>(loc_);
  const auto* attn = static_cast<const coord_t*>(attn_);
  const auto* zeros = static_cast<const scalar_t*>(zeros_);
  auto* out = static_cast<scalar_t*>(out_);
  const int64_t M = p.M, D = p.D, L = p.L, P = p.P, LP = L * P;
  const int64_t row = M * D;  // stride between keys in value
  auto* table = new Entry<scalar_t, acc_t>[LP > 0 ? LP : 1];
  for (int64_t nq = begin; nq < end; ++nq) {
    const scalar_t* value_n = value + (nq / p.Lq) * p.S * row;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t sample0 = (nq * M + m) * LP;
      int64_t count = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = p.H[l], W = p.W[l];
        const scalar_t* level = value_n + p.start[l] * row + m * D;
        for (int64_t pt = 0; pt < P; ++pt) {
          const int64_t i = sample0 + l * P + pt;
          Bilinear<acc_t> b;
          if (!bilinear<acc_t>(to_acc(loc[2 * i]), to_acc(loc[2 * i + 1]), H, W, b)) {
            continue;
          }
          const acc_t a = to_acc(attn[i]);
          auto& e = table[count++];
          for (int c = 0; c < 4; ++c) {
            e.v[c] = b.offset[c] >= 0 ? level + b.offset[c] * row : zeros;
            e.c[c] = corner_coeff(b, a, c);
            prefetch_row(e.v[c], D);
          }
        }
      }
      forward_channels(table, count, D, out + (nq * M + m) * D);
    }
  }
  delete[] table;
}

// --- backward ---
// Sum of the lanes of a vector: rotate-and-add folds (a short dependency chain, no serial sum).
// GCC before 12 has no __builtin_shufflevector: it gets __builtin_shuffle with a mask vector.
typedef int32_t VI32 __attribute__((vector_size(HYBRID_DETR_VEC_BYTES)));
typedef int64_t VI64 __attribute__((vector_size(HYBRID_DETR_VEC_BYTES)));
template <typename V>
struct MaskOf;
template <>
struct MaskOf<VF> {
  using type = VI32;
};
template <>
struct MaskOf<VD> {
  using type = VI64;
};

template <typename V, int Shift, size_t... I>
inline V rotate(V v, std::index_sequence<I...>) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, ((I + Shift) % sizeof...(I))...);
#else
  const typename MaskOf<V>::type mask = {((I + Shift) % sizeof...(I))...};
  return __builtin_shuffle(v, mask);
#endif
}
template <typename V, int Width>
inline V fold(V v) {
  if constexpr (Width > 1) {
    constexpr int lanes = sizeof(V) / sizeof(v[0]);
    v += rotate<V, Width / 2>(v, std::make_index_sequence<lanes>());
    return fold<V, Width / 2>(v);
  }
  return v;
}
template <typename V>
inline auto lane_sum(V v) -> decltype(v[0] + v[0]) {
  return fold<V, int(sizeof(V) / sizeof(v[0]))>(v)[0];
}

// One sample over the channels: dot_c = <go, v_c> per lane, g_c += k_c * go; returns the
// sample's gradients (the shared arithmetic, applied lane-wise to the partial dots, then summed:
// it is linear in the dots, as the CUDA kernel sums it over threads).
template <typename scalar_t, typename acc_t>
inline SampleGrads<acc_t> backward_channels(const Bilinear<acc_t>& b, const acc_t* go, const scalar_t* const v[4],
                                            acc_t* const g[4], const acc_t k[4], int64_t D) {
  using V = typename Vec<acc_t>::type;
  constexpr int VW = Vec<acc_t>::lanes;
  V s[4] = {V{}, V{}, V{}, V{}};
  const V k0 = V{} + k[0], k1 = V{} + k[1], k2 = V{} + k[2], k3 = V{} + k[3];
  int64_t d = 0;
  for (; d + VW <= D; d += VW) {
    const V x = vload(go + d);
    s[0] += x * vload(v[0] + d);
    s[1] += x * vload(v[1] + d);
    s[2] += x * vload(v[2] + d);
    s[3] += x * vload(v[3] + d);
    vstore(g[0] + d, vload(g[0] + d) + k0 * x);
    vstore(g[1] + d, vload(g[1] + d) + k1 * x);
    vstore(g[2] + d, vload(g[2] + d) + k2 * x);
    vstore(g[3] + d, vload(g[3] + d) + k3 * x);
  }
  acc_t t[4] = {0, 0, 0, 0};
  for (; d < D; ++d) {
    const acc_t x = go[d];
    for (int c = 0; c < 4; ++c) {
      t[c] += x * to_acc(v[c][d]);
      g[c][d] += k[c] * x;
    }
  }
  const SampleGrads<V> lanes = sample_grads_partial<acc_t, V>(b, s);
  const SampleGrads<acc_t> tail = sample_grads_partial(b, t);
  return SampleGrads<acc_t>{lane_sum(lanes.attn) + tail.attn, lane_sum(lanes.x) + tail.x,
                            lane_sum(lanes.y) + tail.y};
}

template <typename scalar_t, typename coord_t>
void backward(const Problem& p, const void* grad_out_, const void* value_, const void* loc_, const void* attn_,
              void* grad_value_, void* grad_loc_, void* grad_attn_, const void* zeros_, int64_t begin,
              int64_t end) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int VW = Vec<acc_t>::lanes;
  const auto* grad_out = static_cast<const scalar_t*>(grad_out_);
  const auto* value = static_cast<const scalar_t*>(value_);
  const auto* loc = static_cast<const coord_t*>(loc_);
  const auto* attn = static_cast<const coord_t*>(attn_);
  const auto* zeros = static_cast<const scalar_t*>(zeros_);
  auto* grad_value = static_cast<scalar_t*>(grad_value_);
  auto* grad_loc = static_cast<coord_t*>(grad_loc_);
  auto* grad_attn = static_cast<coord_t*>(grad_attn_);
  const int64_t M = p.M, D = p.D, L = p.L, P = p.P, Lq = p.Lq;
  const int64_t row = M * D;
  int64_t max_keys = 1;
  for (int64_t l = 0; l < L; ++l) {
    max_keys = p.H[l] * p.W[l] > max_keys ? p.H[l] * p.W[l] : max_keys;
  }
  // float / double accumulate in grad_value itself (zero-filled by the caller). bfloat16
  // accumulates the task's slice in a float buffer, keys D apart, then writes it out once: no
  // float32 copy of the whole grad_value and no conversion pass. (For float the copy-out costs
  // more than the caller's zero-fill when few keys are sampled, as in a decoder.)
  constexpr bool kInPlace = std::is_same<scalar_t, acc_t>::value;
  acc_t* slice = new acc_t[(kInPlace ? 0 : max_keys * D) + 4 * D];
  acc_t* sink = slice + (kInPlace ? 0 : max_keys * D);  // the gradient of corners outside the level
  acc_t* go = new acc_t[D > 0 ? D : 1];
  const coord_t zero = from_acc<coord_t>(acc_t(0));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t l = task % L;
    const int64_t m = (task / L) % M;
    const int64_t n = task / (L * M);
    const int64_t H = p.H[l], W = p.W[l];
    const int64_t level_offset = (n * p.S + p.start[l]) * row + m * D;
    const scalar_t* level = value + level_offset;
    acc_t* acc_level = kInPlace ? reinterpret_cast<acc_t*>(grad_value) + level_offset : slice;
    const int64_t acc_stride = kInPlace ? row : D;
    if (!kInPlace) {
      std::memset(slice, 0, sizeof(acc_t) * H * W * D);
    }
    for (int64_t q = 0; q < Lq; ++q) {
      const int64_t nq = n * Lq + q;
      const scalar_t* go_row = grad_out + (nq * M + m) * D;
      bool loaded = false;
      const int64_t sample0 = ((nq * M + m) * L + l) * P;
      for (int64_t pt = 0; pt < P; ++pt) {
        const int64_t i = sample0 + pt;
        Bilinear<acc_t> b;
        if (!bilinear<acc_t>(to_acc(loc[2 * i]), to_acc(loc[2 * i + 1]), H, W, b)) {
          grad_attn[i] = zero;
          grad_loc[2 * i] = zero;
          grad_loc[2 * i + 1] = zero;
          continue;
        }
        if (!loaded) {
          for (int64_t d = 0; d < D; ++d) {
            go[d] = to_acc(go_row[d]);
          }
          loaded = true;
        }
        const acc_t a = to_acc(attn[i]);
        const scalar_t* v[4];
        acc_t* g[4];
        acc_t k[4];
        for (int c = 0; c < 4; ++c) {
          const bool inside = b.offset[c] >= 0;
          v[c] = inside ? level + b.offset[c] * row : zeros;
          g[c] = inside ? acc_level + b.offset[c] * acc_stride : sink + c * D;
          k[c] = corner_coeff(b, a, c);
        }
        const SampleGrads<acc_t> sg = backward_channels(b, go, v, g, k, D);
        acc_t gx, gy;
        sample_grads_finish(sg, a, H, W, gx, gy);
        grad_attn[i] = from_acc<coord_t>(sg.attn);
        grad_loc[2 * i] = from_acc<coord_t>(gx);
        grad_loc[2 * i + 1] = from_acc<coord_t>(gy);
      }
    }
    for (int64_t key = 0; !kInPlace && key < H * W; ++key) {
      const acc_t* src = slice + key * D;
      scalar_t* dst = grad_value + level_offset + key * row;
      int64_t d = 0;
      for (; d + VW <= D; d += VW) {
        vstore(dst + d, vload(src + d));
      }
      for (; d < D; ++d) {
        dst[d] = from_acc<scalar_t>(src[d]);
      }
    }
  }
  delete[] go;
  delete[] slice;
}

} // namespace

const Kernels& kernels() {
  // Indexed by DType: Float, Double, BFloat16, BFloat16 value with float32 coordinates.
  static const Kernels k = {
      HYBRID_DETR_STR(HYBRID_DETR_CPU_NS),
      {forward<float, float>, forward<double, double>, forward<BF16, BF16>, forward<BF16, float>},
      {backward<float, float>, backward<double, double>, backward<BF16, BF16>, backward<BF16, float>},
  };
  return k;
}

} // namespace HYBRID_DETR_CPU_NS
} // namespace cpu
} // namespace hybrid_detr

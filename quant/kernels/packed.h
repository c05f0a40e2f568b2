// What packed.cpp (the QuantLinear kernel) shares with decode.h (the decode loop that runs whole models
// through its Plans): the rotations and a layer's Plan, bound once to the layer's tensors.
#pragma once
// The tensor type, the three ATen ops used and pybind11 with torch's tensor caster: not torch/python.h or
// torch/extension.h, whose headers took 19 s of a 36 s build to parse (these: 10 s)
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <vector>

// GCC/Clang vector extensions: 8 and 16 floats (AVX2 ymm / AVX-512 zmm registers where built with them)
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

// Helpers and lambdas of the per-weight loops: GCC's cost model kept some out of line in the AVX2 build (a
// call per 16 weights, its vectors passed through memory).
#define HOT_INLINE inline __attribute__((always_inline))
#define HOT_LAMBDA __attribute__((always_inline))

static inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The widest float vector the build has registers for: 16 floats with AVX-512, else 8 (GCC splits wider
// vector-extension code through the stack on AVX2). Streaming kernels (8-bit heads, dense matvecs) use it.
#if defined(__AVX512F__)
constexpr int NW = 16;
typedef v16f vnf;
#else
constexpr int NW = 8;
typedef v8f vnf;
#endif

static inline vnf loadn(const float* p) {
  vnf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(v8f v) {  // a tree: 3 dependent adds, not 7
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// The horizontal sums of 8 vectors as one vector (lane j: the sum of p[j]'s lanes): a transposing tree of
// pairwise sums within 4-lane halves, then the halves.
static inline v8f hsum8(const v8f (&p)[8]) {
  auto pairs = [](v8f a, v8f b) {  // a0 + a1, a2 + a3, b0 + b1, b2 + b3, then the same for lanes 4-7
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const v8f a = pairs(pairs(p[0], p[1]), pairs(p[2], p[3])), b = pairs(pairs(p[4], p[5]), pairs(p[6], p[7]));
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}

static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

static inline float hsumn(vnf v) {
#if defined(__AVX512F__)
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  return hsum(v);
#endif
}

struct Rotation {
  int64_t kind = 0, n = 0;  // 0: none, 1: hadamard, 2: butterfly (kron is its one-factor case)
  // hadamard: R = (H_2^a kron H_m) diag(signs) / sqrt(n), index i = i2 * m + im; H = H_m / sqrt(m) or none
  at::Tensor signs, H, Ht;
  // butterfly: R = P_out B A P_in on the (p1, p2) view; A (1 or p2, p1, p1) on the p1 axis, B (1 or p1, p2, p2)
  // on the p2 axis; kept with their transposes (small_matvec takes M^T to apply M)
  at::Tensor A, At, B, Bt, p_in, p_out, inv_in, inv_out;

  Rotation() = default;
  Rotation(int64_t kind_, int64_t n_, std::vector<at::Tensor> t);
  void apply(float* v, int64_t T, bool transpose) const;  // in place on each of T vectors of length n

 private:
  void hadamard(float* x, bool transpose, float* tmp) const;
  void butterfly(float* x, bool transpose, float* tmp, float* buf) const;
};

// A layer's tensors as the kernel reads them (contiguous float32 scales; references keep them alive).
struct PlanTensors {
  at::Tensor in_scale, out_scale, bias, scale, zero, codes;
  std::vector<at::Tensor> stages;  // lattice codes, one tensor per stage
};

// One QuantLinear's static layout: y = out_scale * (U^T W_p V (in_scale * x)) + bias. codec 0: grid (buffer
// "codes", uint8 rows; "scale" and "zero" (R, groups), R = 1 or rows); codec 1: lattice stages (buffers
// "codes0", ... int16 or uint8; "scale" (rows, 1)); codec 2: trellis tiles (buffer "codes" uint8 (rows / tile
// rows, cols / 16, T k / 8); "scale" (rows, 1); `values` the code's 2^L x V values, V = 1 or 2 per state).
struct Plan {
  int64_t rows, cols, in_features, out_features, codec, wbits, groupsize;
  std::vector<int64_t> stage_bits;
  std::vector<double> stage_scales;
  std::vector<py::str> stage_keys;  // "codes0", "codes1", ...
  at::Tensor values;             // trellis: the code's V values of each state, row-major
  int64_t vdim = 1;                 // trellis: V, the weights one state emits
  // trellis 1MAD (stage_scales = [1 / RMS]): 1 / RMS as a float pair, and whether computing the code from
  // the state gives `values` exactly (else the kernel gathers from them)
  float mad_hi = 0, mad_lo = 0;
  bool inline_mad = false;
  Rotation V, U;

  Plan(int64_t rows_, int64_t cols_, int64_t in_, int64_t out_, int64_t codec_, int64_t wbits_, int64_t groupsize_,
       std::vector<int64_t> stage_bits_, std::vector<double> stage_scales_, at::Tensor values_, int64_t v_kind,
       std::vector<at::Tensor> v_factors, int64_t u_kind, std::vector<at::Tensor> u_factors);
  // The layer's current tensors (its _parameters and _buffers dicts), checked against the layout.
  PlanTensors bind(const py::dict& params, const py::dict& buffers) const;
  // y (T, out_features) <- the layer applied to x (T, in_features); threaded over output rows.
  void apply(const PlanTensors& w, const float* x, int64_t T, float* y) const;
  at::Tensor operator()(at::Tensor x, py::dict params, py::dict buffers) const;
};

// CPU forward of quant.QuantLinear at decode token counts: y = out_scale * (U^T W_p V (in_scale * x)) + bias,
// with W_p decoded from its packed codes inside the dot products (never materialized) and the randomized
// Hadamard transforms U, V applied as FWHTs. The layout of codes, tables and rotations is the one
// quant/linear.py, quant/e8p.py and quant/incoherence.py define; quant/kernels/__init__.py is the glue.
//
// Vectors are GCC/Clang vector extensions of 8 floats: one E8P codeword per vector. Built with -mavx2
// -mfma they compile to AVX2 ymm code (FMA, variable shifts); without, to SSE2 or scalar code.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// E8P: codeword = sign * a + shift (quant/e8p.py). SRC holds a with lane 7 negated where sum(a) is odd;
// LOW[low byte] holds the sign bits of lanes 0-6 and, in lane 7, the parity of those 7 bits, so that
// SRC ^ sign carries lane 7's sign (parity of the negative count = parity of sum(a)) with one XOR, and
// the shift (+-1/4 by bit 7) as a vector: no branch on the random shift bit.
struct alignas(64) LowByte {
  int32_t sign[8];
  float shift[8];
};
alignas(32) static float E8P_SRC[256][8];
static LowByte E8P_LOW[256];
alignas(32) static float E8_1BIT[256][8];
static bool tables_set = false;

void set_tables(torch::Tensor e8p_abs, torch::Tensor e8p_odd, torch::Tensor e8_1bit) {
  auto a = e8p_abs.to(torch::kFloat32).contiguous();
  auto odd = e8p_odd.to(torch::kInt32).contiguous();
  auto g = e8_1bit.to(torch::kFloat32).contiguous();
  TORCH_CHECK(a.numel() == 256 * 8 && odd.numel() == 256 && g.numel() == 256 * 8, "table shapes");
  for (int i = 0; i < 256; ++i) {
    for (int k = 0; k < 8; ++k) {
      E8P_SRC[i][k] = a.data_ptr<float>()[i * 8 + k];
      E8_1BIT[i][k] = g.data_ptr<float>()[i * 8 + k];
    }
    if (odd.data_ptr<int32_t>()[i]) E8P_SRC[i][7] = -E8P_SRC[i][7];
  }
  for (int s = 0; s < 256; ++s) {
    for (int k = 0; k < 7; ++k) E8P_LOW[s].sign[k] = (s >> k & 1) ? INT32_MIN : 0;
    E8P_LOW[s].sign[7] = (__builtin_popcount(s & 127) & 1) ? INT32_MIN : 0;
    for (int k = 0; k < 8; ++k) E8P_LOW[s].shift[k] = (s & 128) ? 0.25f : -0.25f;
  }
  tables_set = true;
}

static inline v8f e8p_word(uint32_t c) {
  v8f a = load8(E8P_SRC[c >> 8]);
  const LowByte& low = E8P_LOW[c & 255];
  v8i s;
  std::memcpy(&s, low.sign, sizeof s);
  return (v8f)((v8i)a ^ s) + load8(low.shift);
}

// NT tokens' dot products with one row, U independent accumulators per token (hides the FMA latency at
// small NT). `dec(b)` is block b (8 weights) of the row; z holds NT token rows of stride zs.
template <int NT, int U>
struct RowAcc {
  v8f a[NT][U];
  RowAcc() {
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < U; ++u) a[t][u] = (v8f){};
  }
  template <class Dec>
  inline void run(const float* z, int64_t zs, int64_t b0, int64_t b1, Dec dec) {
    int64_t b = b0;
    for (; b + U <= b1; b += U)
      for (int u = 0; u < U; ++u) {
        v8f w = dec(b + u);
        for (int t = 0; t < NT; ++t) a[t][u] += w * load8(z + t * zs + 8 * (b + u));
      }
    for (; b < b1; ++b) {
      v8f w = dec(b);
      for (int t = 0; t < NT; ++t) a[t][0] += w * load8(z + t * zs + 8 * b);
    }
  }
  inline float sum(int t) const {
    v8f s = a[t][0];
    for (int u = 1; u < U; ++u) s += a[t][u];
    return hsum(s);
  }
};

template <int NT>
constexpr int unroll() { return NT == 1 ? 4 : NT == 2 ? 2 : 1; }

// Calls f.template operator()<NT>(t0) for token tiles of at most 8.
template <class F>
static void token_tiles(int64_t T, F f) {
  for (int64_t t0 = 0; t0 < T; t0 += 8) {
    switch (std::min<int64_t>(8, T - t0)) {
      case 1: f.template go<1>(t0); break;
      case 2: f.template go<2>(t0); break;
      case 3: f.template go<3>(t0); break;
      case 4: f.template go<4>(t0); break;
      case 5: f.template go<5>(t0); break;
      case 6: f.template go<6>(t0); break;
      case 7: f.template go<7>(t0); break;
      default: f.template go<8>(t0); break;
    }
  }
}

// ---- scalar grids: value = scale * (code - zero), codes of W bits little-endian in each row's bytes, so
// 8 codes are W whole bytes. Per group a 2^W-entry table of the values (the torch path's floats exactly)
// turns codes into weights with one vector permute.
template <int W>
struct GridRows {
  const float* z; int64_t zs, T; float* y; int64_t ys;
  const uint8_t* codes; int64_t nbytes; int64_t cols;
  const float* scale; const float* zero; int64_t sstride, groups, groupsize;
  int64_t r;

  inline uint32_t code(const uint8_t* row, int64_t c) const {  // any column, by its bit offset
    int64_t bit = c * W;
    uint32_t v = 0;
    std::memcpy(&v, row + (bit >> 3), std::min<int64_t>(4, nbytes - (bit >> 3)));
    return (v >> (bit & 7)) & ((1u << W) - 1);
  }

  template <int NT>
  void go(int64_t t0) const {
    const uint8_t* row = codes + r * nbytes;
    const float* sc = scale + r * sstride;
    const float* ze = zero + r * sstride;
    const float* zt = z + t0 * zs;
    float out[NT] = {};
    int64_t nb = cols / 8, done = 0;
    if (groups == 1 || groupsize % 8 == 0) {
      RowAcc<NT, unroll<NT>()> acc;
      const v8u shifts = (v8u){0, 1, 2, 3, 4, 5, 6, 7} * (uint32_t)W;
      int64_t bpg = groups == 1 ? nb : groupsize / 8;
      for (int64_t g = 0, b0 = 0; b0 < nb; ++g, b0 += bpg) {
        alignas(32) float table[16] = {};
        for (int q = 0; q < (1 << W); ++q) table[q] = ((float)q - ze[g]) * sc[g];
        const v8f lo = load8(table), hi = load8(table + 8);
        acc.run(zt, zs, b0, std::min(nb, b0 + bpg), [&](int64_t b) {
          uint32_t word = 0;
          std::memcpy(&word, row + b * W, W);
          v8i q = (v8i)((((v8u){} + word) >> shifts) & ((1u << W) - 1));
          if constexpr (W == 4)
            return __builtin_shuffle(lo, hi, q);
          else
            return __builtin_shuffle(lo, q);
        });
      }
      for (int t = 0; t < NT; ++t) out[t] = acc.sum(t);
      done = 8 * nb;
    }
    for (int64_t c = done; c < cols; ++c) {  // tail columns, or every column when groups do not tile by 8
      int64_t g = groups == 1 ? 0 : c / groupsize;
      float w = ((float)code(row, c) - ze[g]) * sc[g];
      for (int t = 0; t < NT; ++t) out[t] += w * zt[t * zs + c];
    }
    for (int t = 0; t < NT; ++t) y[(t0 + t) * ys + r] = out[t];
  }
};

template <int W>
static void grid_matmul(GridRows<W> g, int64_t rows, int64_t grain) {
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    GridRows<W> w = g;
    for (w.r = r0; w.r < r1; ++w.r) token_tiles(w.T, w);
  });
}

// ---- lattice codebooks: stage i adds decode_i(codes_i) / stage_scale_i; one scale per row.
struct VectorRows {
  const float* z; int64_t zs, T; float* y; int64_t ys;
  std::vector<const void*> codes; std::vector<int64_t> bits; std::vector<double> stage_scales;
  int64_t nb; const float* scale;
  int64_t r;

  template <int NT>
  void go(int64_t t0) const {
    const float* zt = z + t0 * zs;
    float out[NT] = {};
    for (size_t i = 0; i < codes.size(); ++i) {
      RowAcc<NT, unroll<NT>()> acc;
      if (bits[i] == 16) {
        const uint16_t* c = (const uint16_t*)codes[i] + r * nb;
        acc.run(zt, zs, 0, nb, [&](int64_t b) { return e8p_word(c[b]); });
      } else {
        const uint8_t* c = (const uint8_t*)codes[i] + r * nb;
        acc.run(zt, zs, 0, nb, [&](int64_t b) { return load8(E8_1BIT[c[b]]); });
      }
      for (int t = 0; t < NT; ++t) out[t] += acc.sum(t) / (float)stage_scales[i];
    }
    for (int t = 0; t < NT; ++t) y[(t0 + t) * ys + r] = out[t] * scale[r];
  }
};

// ---- randomized Hadamard transform R = (H_2^a kron H_m) diag(signs) / sqrt(n), index i = i2 * m + im.
static void fwht(float* v, int64_t k2, int64_t m) {
  for (int64_t h = 1; h < k2; h <<= 1)
    for (int64_t i = 0; i < k2; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        float* a = v + j * m;
        float* b = a + h * m;
        for (int64_t k = 0; k < m; ++k) {
          float p = a[k], q = b[k];
          a[k] = p + q;
          b[k] = p - q;
        }
      }
  const float s = 1.0f / std::sqrt((float)k2);
  for (int64_t i = 0; i < k2 * m; ++i) v[i] *= s;
}

static void small_factor(float* v, int64_t k2, int64_t m, const float* H, bool transpose, float* tmp) {
  for (int64_t i = 0; i < k2; ++i) {
    float* x = v + i * m;
    for (int64_t p = 0; p < m; ++p) {
      float s = 0;
      for (int64_t q = 0; q < m; ++q) s += (transpose ? H[q * m + p] : H[p * m + q]) * x[q];
      tmp[p] = s;
    }
    std::memcpy(x, tmp, m * sizeof(float));
  }
}

// In place on each of the T rows of v (length n): R v (transpose false) or R^T v.
static void rht(float* v, int64_t T, int64_t n, const torch::Tensor& signs, const c10::optional<torch::Tensor>& Hm,
                bool transpose) {
  const float* s = signs.data_ptr<float>();
  int64_t m = Hm.has_value() ? Hm->size(0) : 1, k2 = n / m;
  std::vector<float> tmp(m);
  for (int64_t t = 0; t < T; ++t) {
    float* x = v + t * n;
    if (!transpose) {
      for (int64_t i = 0; i < n; ++i) x[i] *= s[i];
      fwht(x, k2, m);
      if (m > 1) small_factor(x, k2, m, Hm->data_ptr<float>(), false, tmp.data());
    } else {
      if (m > 1) small_factor(x, k2, m, Hm->data_ptr<float>(), true, tmp.data());
      fwht(x, k2, m);
      for (int64_t i = 0; i < n; ++i) x[i] *= s[i];
    }
  }
}

static c10::optional<torch::Tensor> f32(const c10::optional<torch::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->to(torch::kFloat32).contiguous();
}

// x (T, in_features) float32 -> (T, out_features). Rotations: hadamard factors (signs, optional H_m) of V
// (columns) and U (rows), or none (the caller rotates). codec 0: grid (codes[0] uint8 rows, scale/zero of
// shape (R, groups), R = 1 or rows); codec 1: lattice stages (codes[i] int16 or uint8, scale (rows, 1)).
torch::Tensor forward(torch::Tensor x, c10::optional<torch::Tensor> in_scale, c10::optional<torch::Tensor> out_scale,
                      c10::optional<torch::Tensor> bias, int64_t rows, int64_t cols, int64_t out_features,
                      c10::optional<torch::Tensor> v_signs, c10::optional<torch::Tensor> v_h,
                      c10::optional<torch::Tensor> u_signs, c10::optional<torch::Tensor> u_h, int64_t codec,
                      std::vector<torch::Tensor> codes, torch::Tensor scale, c10::optional<torch::Tensor> zero,
                      int64_t wbits, int64_t groupsize, std::vector<int64_t> stage_bits,
                      std::vector<double> stage_scales) {
  TORCH_CHECK(tables_set, "set_tables first");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "x: (T, in) float32 CPU");
  x = x.contiguous();
  const int64_t T = x.size(0), in = x.size(1);
  TORCH_CHECK(in <= cols && out_features <= rows, "shapes");
  in_scale = f32(in_scale); out_scale = f32(out_scale); bias = f32(bias);
  v_signs = f32(v_signs); v_h = f32(v_h); u_signs = f32(u_signs); u_h = f32(u_h);
  scale = scale.to(torch::kFloat32).contiguous();
  for (auto& c : codes) c = c.contiguous();

  auto z = torch::zeros({T, cols}, x.options());
  float* zp = z.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* isp = in_scale.has_value() ? in_scale->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < in; ++i) zp[t * cols + i] = isp ? xp[t * in + i] * isp[i] : xp[t * in + i];
  if (v_signs.has_value()) rht(zp, T, cols, *v_signs, v_h, false);

  auto out = torch::empty({T, rows}, x.options());
  float* yp = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, cols * T));
  if (codec == 0) {
    TORCH_CHECK(zero.has_value() && codes.size() == 1 && wbits >= 2 && wbits <= 4, "grid arguments");
    auto zr = zero->to(torch::kFloat32).contiguous();
    TORCH_CHECK(codes[0].size(0) == rows && codes[0].size(1) == (cols * wbits + 7) / 8, "grid codes shape");
    const uint8_t* cp = codes[0].data_ptr<uint8_t>();
    const float *sp = scale.data_ptr<float>(), *zp0 = zr.data_ptr<float>();
    const int64_t nbytes = codes[0].size(1), ss = scale.size(0) > 1 ? scale.size(1) : 0, groups = scale.size(1);
    auto run = [&](auto w) {
      using G = decltype(w);
      grid_matmul(G{zp, cols, T, yp, rows, cp, nbytes, cols, sp, zp0, ss, groups, groupsize, 0}, rows, grain);
    };
    if (wbits == 2) run(GridRows<2>{});
    if (wbits == 3) run(GridRows<3>{});
    if (wbits == 4) run(GridRows<4>{});
  } else {
    TORCH_CHECK(cols % 8 == 0 && codes.size() == stage_bits.size() && codes.size() == stage_scales.size(),
                "vector arguments");
    VectorRows v{zp, cols, T, yp, rows, {}, stage_bits, stage_scales, cols / 8, scale.data_ptr<float>(), 0};
    for (size_t i = 0; i < codes.size(); ++i) {
      const auto& c = codes[i];
      TORCH_CHECK(c.dim() == 2 && c.size(0) == rows && c.size(1) == cols / 8 && c.element_size() * 8 == stage_bits[i],
                  "vector codes shape");
      v.codes.push_back(c.data_ptr());
    }
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      VectorRows w = v;
      for (w.r = r0; w.r < r1; ++w.r) token_tiles(T, w);
    });
  }
  if (u_signs.has_value()) rht(yp, T, rows, *u_signs, u_h, true);
  if (out_features == rows && !out_scale.has_value() && !bias.has_value()) return out;
  auto y = torch::empty({T, out_features}, x.options());
  float* op = y.data_ptr<float>();
  const float* osp = out_scale.has_value() ? out_scale->data_ptr<float>() : nullptr;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < out_features; ++i) {
      float v = yp[t * rows + i];
      if (osp) v *= osp[i];
      if (bp) v += bp[i];
      op[t * out_features + i] = v;
    }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_tables", &set_tables, "E8P and E8 1-bit tables from quant.e8p");
  m.def("forward", &forward, "QuantLinear forward from packed codes (decode token counts)");
}

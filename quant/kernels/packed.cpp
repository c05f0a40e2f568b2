// CPU forward of quant.QuantLinear at decode token counts: y = out_scale * (U^T W_p V (in_scale * x)) + bias,
// with W_p decoded from its packed codes inside the dot products (never materialized) and the randomized
// Hadamard transforms U, V applied as FWHTs. The layout of codes, tables and rotations is the one
// quant/linear.py, quant/e8p.py and quant/incoherence.py define; quant/kernels/__init__.py is the glue.
//
// Vectors are GCC/Clang vector extensions of 8 floats: one E8P codeword per vector. Built with -mavx2
// -mfma they compile to AVX2 ymm code (FMA, variable shifts); without, to SSE2 or scalar code.
#include "packed.h"
#include "decode.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v16i __attribute__((vector_size(64)));

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

void set_tables(at::Tensor e8p_abs, at::Tensor e8p_odd, at::Tensor e8_1bit) {
  auto a = e8p_abs.to(at::kFloat).contiguous();
  auto odd = e8p_odd.to(at::kInt).contiguous();
  auto g = e8_1bit.to(at::kFloat).contiguous();
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
  inline v8f lanes(int t) const {
    v8f s = a[t][0];
    for (int u = 1; u < U; ++u) s += a[t][u];
    return s;
  }
  inline float sum(int t) const { return hsum(lanes(t)); }
};

template <int NT>
constexpr int unroll() { return NT == 1 ? 4 : NT == 2 ? 2 : 1; }

// Calls f.template go<NT>(t0) for token tiles of at most 8.
template <class F>
static void token_tiles(int64_t T, const F& f) {
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

// Every output row of a row kernel (GridRows, ByteRows, VectorRows, TrellisRows: fields T and r, go<NT>),
// threaded over rows; each thread works on its own copy.
template <class Rows>
static void each_row(const Rows& rows_of, int64_t rows, int64_t grain) {
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    Rows w = rows_of;
    for (w.r = r0; w.r < r1; ++w.r) token_tiles(w.T, w);
  });
}

// each_row, except for one token (the decode step) through a row kernel that has rows8(r0) (rows r0 .. r0 + 7,
// their horizontal sums in one hsum8 instead of a scalar tail per row: about a tenth of a 576-wide row's
// time), where the rows tile by 8.
template <class Rows>
static void each_row_of_one_token(const Rows& rows_of, int64_t rows, int64_t grain) {
  if constexpr (requires { rows_of.rows8(int64_t{0}); }) {
    if (rows_of.T == 1 && rows % 8 == 0) {
      at::parallel_for(0, rows / 8, std::max<int64_t>(1, grain / 8), [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) rows_of.rows8(8 * g);
      });
      return;
    }
  }
  each_row(rows_of, rows, grain);
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
          const uint8_t* p = row + b * W;
          uint32_t word = 0;
          if constexpr (W == 3)  // in registers: a 3-byte memcpy goes through the stack, 8x slower
            word = p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
          else
            std::memcpy(&word, p, W);
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

// ---- 8-bit grids (quantized heads): sum_g scale_g (sum_i (q_i - 128) x_i - (zero_g - 128) X_g), X_g the
// group's sum of x, shared by every row. Centring keeps both terms small (zero points lie near 128), so the
// factored sum agrees with the direct one to rounding; a weight costs a widening, a conversion and an FMA.
static inline vnf centred(const uint8_t* p) {  // NW codes q as floats q - 128
#if defined(__AVX512F__)  // one widening load (the generic form below compiles to byte unpacks)
  return (vnf)_mm512_cvtepi32_ps(
      _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), _mm512_set1_epi32(128)));
#elif defined(__AVX2__)
  return (vnf)_mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)), _mm256_set1_epi32(128)));
#else
  vnf v;
  for (int i = 0; i < NW; ++i) v[i] = (float)p[i] - 128.0f;
  return v;
#endif
}

struct ByteRows {
  const float* z; int64_t zs, T; float* y; int64_t ys;
  const uint8_t* codes; int64_t cols;
  const float* scale; const float* zero; int64_t sstride, groups, groupsize;
  const float* xsum;  // (T, groups): each token's sum of z over each group
  int64_t r;

  template <int NT>
  void go(int64_t t0) const {
    const uint8_t* row = codes + r * cols;
    const float* sc = scale + r * sstride;
    const float* ze = zero + r * sstride;
    const float* zt = z + t0 * zs;
    const int64_t span = groups == 1 ? cols : groupsize;
    float out[NT] = {};
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * span, c1 = std::min(cols, c0 + span);
      vnf a[NT][4] = {};
      int64_t c = c0;
      auto block = [&](int64_t cc, int u) HOT_LAMBDA {
        for (int t = 0; t < NT; ++t) a[t][u] += centred(row + cc) * loadn(zt + t * zs + cc);
      };
      for (; c + 4 * NW <= c1; c += 4 * NW) block(c, 0), block(c + NW, 1), block(c + 2 * NW, 2), block(c + 3 * NW, 3);
      for (; c + NW <= c1; c += NW) block(c, 0);
      for (int t = 0; t < NT; ++t) {
        float dot = hsumn((a[t][0] + a[t][1]) + (a[t][2] + a[t][3]));
        for (int64_t cc = c; cc < c1; ++cc) dot += ((float)row[cc] - 128.0f) * zt[t * zs + cc];
        out[t] += sc[g] * (dot - (ze[g] - 128.0f) * xsum[(t0 + t) * groups + g]);
      }
    }
    for (int t = 0; t < NT; ++t) y[(t0 + t) * ys + r] = out[t];
  }
};

// ---- lattice codebooks: stage i adds decode_i(codes_i) / stage_scale_i; one scale per row.
struct VectorRows {
  const float* z; int64_t zs, T; float* y; int64_t ys;
  std::vector<const void*> codes; std::vector<int64_t> bits; std::vector<double> stage_scales;
  int64_t nb; const float* scale;
  int64_t r;

  // Row r's dot products with NT tokens from t0, as 8 lanes each: every stage's, divided by its scale
  template <int NT>
  void lanes_of(int64_t t0, int64_t r, v8f* out) const {
    const float* zt = z + t0 * zs;
    for (int t = 0; t < NT; ++t) out[t] = (v8f){};
    for (size_t i = 0; i < codes.size(); ++i) {
      RowAcc<NT, unroll<NT>()> acc;
      if (bits[i] == 16) {
        const uint16_t* c = (const uint16_t*)codes[i] + r * nb;
        acc.run(zt, zs, 0, nb, [&](int64_t b) { return e8p_word(c[b]); });
      } else {
        const uint8_t* c = (const uint8_t*)codes[i] + r * nb;
        acc.run(zt, zs, 0, nb, [&](int64_t b) { return load8(E8_1BIT[c[b]]); });
      }
      for (int t = 0; t < NT; ++t) out[t] += acc.lanes(t) / (float)stage_scales[i];
    }
  }

  template <int NT>
  void go(int64_t t0) const {
    v8f out[NT];
    lanes_of<NT>(t0, r, out);
    for (int t = 0; t < NT; ++t) y[(t0 + t) * ys + r] = hsum(out[t]) * scale[r];
  }

  void rows8(int64_t r0) const {  // one token (each_row_of_one_token)
    v8f p[8];
    for (int j = 0; j < 8; ++j) lanes_of<1>(0, r0 + j, &p[j]);
    store8(y + r0, hsum8(p) * load8(scale + r0));
  }
};

// ---- trellis tiles (quant/codebooks/trellis.py): with V = 1 codes weight i of a tile is values[state_i],
// state_i the L-bit window of the tile's circular big-endian bitstream that ends (i + 1) k bits in (V = 2: see
// TrellisRows::row16_pairs). A tile row is 16 weights, one vector; each half of 8 reads one 64-bit window
// that starts 16 bits before its first weight's k bits. The 1MAD code is computed from the state (an LCG, the sum of its 4 bytes, times 1 / RMS as a
// float pair: exact, the Plan checks every state against the table); other codes gather from the table.
typedef uint64_t v8q __attribute__((vector_size(64)));

// quant.trellis' 1MAD: (sum of the bytes of MUL s + ADD - BIAS) / RMS. The kernel sums the integer
// part times x and scales each row's sum by 1 / RMS once.
struct Mad {
  static constexpr uint32_t MUL = 34038481u, ADD = 76625530u;
  static constexpr int32_t BIAS = 510;
  float hi = 0, lo = 0;  // 1 / RMS = hi + lo
  inline float scaled(float y) const { return std::fma(y, hi, y * lo); }
  inline float value(uint32_t s) const {
    const uint32_t x = s * MUL + ADD;
    return scaled((float)((int32_t)((x & 255) + (x >> 8 & 255) + (x >> 16 & 255) + (x >> 24)) - BIAS));
  }
  static inline v16f unscaled(v16u s) {
    const v16u x = s * MUL + ADD;
#if defined(__AVX512BW__)  // byte pairs, then pairs of pairs, summed by two multiply-adds with ones
    __m512i xi;
    std::memcpy(&xi, &x, sizeof xi);
    const __m512i bytes = _mm512_madd_epi16(_mm512_maddubs_epi16(xi, _mm512_set1_epi8(1)), _mm512_set1_epi16(1));
    return (v16f)_mm512_cvtepi32_ps(_mm512_sub_epi32(bytes, _mm512_set1_epi32(BIAS)));
#else
    const v16u pairs = (x & 0x00ff00ffu) + (x >> 8 & 0x00ff00ffu);
    return __builtin_convertvector((v16i)((pairs & 0xffffu) + (pairs >> 16)) - BIAS, v16f);
#endif
  }
#if defined(__AVX2__) && !defined(__AVX512F__)
  // 8 states' byte sums, BIAS not subtracted: a row's caller subtracts BIAS times the sum of its inputs once
  static HOT_INLINE __m256 biased(__m256i s) {
    const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32((int)MUL)), _mm256_set1_epi32((int)ADD));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(x, _mm256_set1_epi8(1)), _mm256_set1_epi16(1)));
  }
#endif
};

// States of 16 weights from stream bit q: lane j is bits [p, p + L) of the 64 stream bits from q - 16 (first
// bit most significant), p = 16 + (j + 1) k - L.
struct Lanes {
  v8q shifts;       // two 64-bit windows, 8 lanes each
  v8q pair_shifts;  // V = 2 (TrellisRows::row16_pairs): states 0-3 and 4-7 of two windows, 2k bits apart
#if defined(__AVX512F__)
  __m512i word, right;  // k <= 3: one window; per lane, the 32-bit word that holds its bits and the shift
#elif defined(__AVX2__)
  // 8 lanes from one window as it lies in memory (8 bytes, broadcast): lane j's 4 bytes byte-reversed into a
  // big-endian word that holds bits [p + 16 - L, p + 16), p = (j + 1) k, and the shift that ends the state
  // there; `pairs` the same for HYB's states 0-3 (p = (j + 1) 2k)
  __m256i bytes, right;
  __m128i pair_bytes, pair_right;
#endif
  Lanes(int64_t k, int64_t L) {
    for (int j = 0; j < 8; ++j) shifts[j] = 64 - 16 - (j + 1) * k;
    for (int j = 0; j < 4; ++j) pair_shifts[j] = pair_shifts[j + 4] = 48 - (j + 1) * 2 * k;
#if defined(__AVX512F__)
    alignas(64) int32_t w[16], r[16];
    for (int j = 0; j < 16; ++j) {  // words: 0 = bits 32-63, 1 = bits 0-31, 2 = bits 16-47
      const int p = (int)((j + 1) * k);
      w[j] = p + 16 <= 32 ? 1 : p + 16 <= 48 ? 2 : 0;
      r[j] = (w[j] == 1 ? 32 : w[j] == 2 ? 48 : 64) - 16 - p;
    }
    word = _mm512_load_si512(w), right = _mm512_load_si512(r);
#elif defined(__AVX2__)
    alignas(32) uint8_t b[32], pb[16];
    alignas(32) int32_t r[8], pr[4];
    auto cut = [L](int64_t p, uint8_t* lane_bytes, int32_t& shift) {  // first byte: any state fits 4 bytes
      const int64_t first = std::min<int64_t>(4, (p + 16 - L) / 8);
      for (int t = 0; t < 4; ++t) lane_bytes[t] = (uint8_t)(first + 3 - t);
      shift = (int32_t)(8 * first + 32 - (p + 16));
    };
    for (int j = 0; j < 8; ++j) cut((j + 1) * k, b + 4 * j, r[j]);
    for (int j = 0; j < 4; ++j) cut((j + 1) * 2 * k, pb + 4 * j, pr[j]);
    bytes = _mm256_load_si256((const __m256i*)b), right = _mm256_load_si256((const __m256i*)r);
    pair_bytes = _mm_load_si128((const __m128i*)pb), pair_right = _mm_load_si128((const __m128i*)pr);
#endif
  }
};

struct TrellisRows {
  const float* z; int64_t zs, T; float* y; int64_t ys;
  const uint8_t* codes; int64_t nbytes, nblk, tile_rows, k, L; const float* values; const float* scale;
  const Mad* mad;  // null: gather from values
  const float* zsum;  // with mad, on AVX2: each token's sum of z (row8's 1MAD values carry BIAS)
  const Lanes* lanes;
  bool pairs;  // V = 2: values holds two weights per state
  int64_t r;

  static inline uint64_t load_be(const uint8_t* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    return __builtin_bswap64(w);
  }

  // 64 stream bits from bit q - 16, the first most significant; the stream is circular (nbytes >= 8)
  HOT_INLINE uint64_t window(const uint8_t* s, int64_t q) const {
    const int64_t b0 = q / 8 - 2;
    if (b0 >= 0 && b0 + 8 <= nbytes) return load_be(s + b0);
    if (b0 < 0)  // a tile's first row: the stream's last 2 bytes, then its first 6
      return (uint64_t)s[nbytes - 2] << 56 | (uint64_t)s[nbytes - 1] << 48 | load_be(s) >> 16;
    const int64_t e = 8 * (b0 + 8 - nbytes);  // its last row: the bits past the end come from the start
    return load_be(s + nbytes - 8) << e | load_be(s) >> (64 - e);
  }

  // The states of 16 weights from stream bit q (Lanes).

  inline v16u states(const uint8_t* s, int64_t q, const Lanes& lanes, uint64_t mask) const {
#if defined(__AVX512F__)
    if (k <= 3) {  // 16 + 16 k <= 64: one window, its three 32-bit words permuted into the lanes
      const uint64_t w = window(s, q);
      const __m128i words = _mm_insert_epi32(_mm_cvtsi64_si128((long long)w), (int)(uint32_t)(w >> 16), 2);
      const __m512i st = _mm512_and_si512(
          _mm512_srlv_epi32(_mm512_permutexvar_epi32(lanes.word, _mm512_castsi128_si512(words)), lanes.right),
          _mm512_set1_epi32((int)mask));
      v16u out;
      std::memcpy(&out, &st, sizeof out);
      return out;
    }
#endif
    const v8q lo = (((v8q){} + window(s, q)) >> lanes.shifts) & mask;
    const v8q hi = (((v8q){} + window(s, q + 8 * k)) >> lanes.shifts) & mask;
    return __builtin_shufflevector(__builtin_convertvector(lo, v8u), __builtin_convertvector(hi, v8u), 0, 1, 2, 3, 4,
                                   5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }

  // V = 2: 8 states, state j the L bits that end (j + 1) 2k bits after q, each giving weights 2j and 2j + 1
  // (values[2 state], values[2 state + 1]); states 0-3 from the window at q, 4-7 from the one at q + 8k.
  inline v16f row16_pairs(const uint8_t* s, int64_t q, const Lanes& lanes, uint64_t mask) const {
    const uint64_t w0 = window(s, q), w1 = window(s, q + 8 * k);
    const v8q words = {w0, w0, w0, w0, w1, w1, w1, w1};
    const v8q st = (words >> lanes.pair_shifts) & mask;
#if defined(__AVX2__)  // a state's two values as one 64-bit gather, four states per instruction
    __m256i lo, hi;
    std::memcpy(&lo, &st, 32), std::memcpy(&hi, reinterpret_cast<const char*>(&st) + 32, 32);
    const auto* table = reinterpret_cast<const long long*>(values);
    const __m256i a = _mm256_i64gather_epi64(table, lo, 8), b = _mm256_i64gather_epi64(table, hi, 8);
    v16f v;
    std::memcpy(&v, &a, 32), std::memcpy(reinterpret_cast<char*>(&v) + 32, &b, 32);
    return v;
#else
    v16f v;
    for (int j = 0; j < 8; ++j) v[2 * j] = values[2 * st[j]], v[2 * j + 1] = values[2 * st[j] + 1];
    return v;
#endif
  }

  inline v16f row16(const uint8_t* s, int64_t q, const Lanes& lanes, uint64_t mask) const {  // 16 weights
    if (pairs) return row16_pairs(s, q, lanes, mask);
    const v16u st = states(s, q, lanes, mask);
    if (mad != nullptr) return Mad::unscaled(st);
#if defined(__AVX512F__)
    __m512i i;
    std::memcpy(&i, &st, sizeof i);
    return (v16f)_mm512_i32gather_ps(i, values, 4);
#else
    v16f v;
    for (int j = 0; j < 16; ++j) v[j] = values[st[j]];
    return v;
#endif
  }

#if defined(__AVX2__) && !defined(__AVX512F__)
  // AVX2 has no 16-float registers, and GCC assembles 16-float vector code through the stack there: row8
  // cuts 8 weights (one register) from window w, the first or second half of a tile row. The code (1MAD,
  // a table, HYB's pairs) and whether the row's windows lie inside the stream are template arguments, so
  // the loop over a row's tiles has no branch.
  enum Code { MAD, TABLE, PAIRS };

  template <Code CODE>
  HOT_INLINE __m256 row8(long long raw, const Lanes& lanes) const {  // raw: the window's 8 bytes in memory order
    if (CODE == PAIRS) {  // states 0-3 (row16_pairs), each state's pair of values one 64-bit gather
      const __m128i st = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi8(_mm_set1_epi64x(raw), lanes.pair_bytes),
                                                      lanes.pair_right), _mm_set1_epi32((int)((1u << L) - 1)));
      return _mm256_castsi256_ps(_mm256_i32gather_epi64(reinterpret_cast<const long long*>(values), st, 8));
    }
    const __m256i st = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(_mm256_set1_epi64x(raw), lanes.bytes),
                                                          lanes.right), _mm256_set1_epi32((int)((1u << L) - 1)));
    return CODE == TABLE ? _mm256_i32gather_ps(values, st, 4) : Mad::biased(st);
  }

  HOT_INLINE long long raw_window(const uint8_t* s, int64_t q) const {  // any row: window's bytes back in order
    return (long long)__builtin_bswap64(window(s, q));
  }

  static HOT_INLINE long long raw_load(const uint8_t* p) {
    long long raw;
    std::memcpy(&raw, p, sizeof raw);
    return raw;
  }

  // Row r's dot products with NT tokens from t0, each left as the 8 lanes of its two halves' accumulators
  template <int NT, Code CODE, bool INSIDE>
  HOT_INLINE void lanes_of(int64_t t0, int64_t r, v8f* out) const {
    const float* zt = z + t0 * zs;
    const int64_t q0 = (r % tile_rows) * 16 * k, q1 = q0 + 8 * k;
    const uint8_t* tile = codes + (r / tile_rows) * nblk * nbytes;
    __m256 acc[NT][2];
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b, tile += nbytes) {  // tile row (r, b): columns 16 b .. 16 b + 15
      const long long w0 = INSIDE ? raw_load(tile + q0 / 8 - 2) : raw_window(tile, q0);
      const long long w1 = INSIDE ? raw_load(tile + q1 / 8 - 2) : raw_window(tile, q1);
      const __m256 lo = row8<CODE>(w0, *lanes), hi = row8<CODE>(w1, *lanes);
      for (int t = 0; t < NT; ++t) {
        acc[t][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(zt + t * zs + 16 * b), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(zt + t * zs + 16 * b + 8), acc[t][1]);
      }
    }
    for (int t = 0; t < NT; ++t) out[t] = acc[t][0] + acc[t][1];
  }

  template <int NT, Code CODE>
  HOT_INLINE void lanes_of(int64_t t0, int64_t r, v8f* out) const {
    const int64_t q0 = (r % tile_rows) * 16 * k;  // both windows within the stream's bytes
    if (q0 / 8 - 2 >= 0 && (q0 + 8 * k) / 8 + 6 <= nbytes)
      lanes_of<NT, CODE, true>(t0, r, out);
    else
      lanes_of<NT, CODE, false>(t0, r, out);
  }

  template <int NT, Code CODE>
  void row(int64_t t0) const {
    v8f out[NT];
    lanes_of<NT, CODE>(t0, r, out);
    for (int t = 0; t < NT; ++t) {
      const float sum = hsum(out[t]);
      y[(t0 + t) * ys + r] = (CODE == MAD ? mad->scaled(sum - Mad::BIAS * zsum[t0 + t]) : sum) * scale[r];
    }
  }

  // One token, rows r0 .. r0 + 7 (each_row_of_one_token), scaled as vectors
  template <Code CODE>
  void rows8_of(int64_t r0) const {
    v8f p[8];
    for (int j = 0; j < 8; ++j) lanes_of<1, CODE>(0, r0 + j, &p[j]);
    __m256 v = hsum8(p);  // rows r0 .. r0 + 7
    if (CODE == MAD) {
      v -= _mm256_set1_ps(Mad::BIAS * zsum[0]);
      v = _mm256_fmadd_ps(v, _mm256_set1_ps(mad->hi), v * _mm256_set1_ps(mad->lo));  // Mad::scaled
    }
    _mm256_storeu_ps(y + r0, v * _mm256_loadu_ps(scale + r0));
  }

  template <int NT>
  void go(int64_t t0) const {
    if (pairs)
      row<NT, PAIRS>(t0);
    else if (mad != nullptr)
      row<NT, MAD>(t0);
    else
      row<NT, TABLE>(t0);
  }

  void rows8(int64_t r0) const {
    if (pairs)
      rows8_of<PAIRS>(r0);
    else if (mad != nullptr)
      rows8_of<MAD>(r0);
    else
      rows8_of<TABLE>(r0);
  }
#else
  template <int NT>
  void go(int64_t t0) const {
    const float* zt = z + t0 * zs;
    const int64_t q0 = (r % tile_rows) * 16 * k;
    const uint8_t* tiles = codes + (r / tile_rows) * nblk * nbytes;
    const uint64_t mask = (1ull << L) - 1;
    v16f acc[NT][2] = {};
    auto block = [&](int64_t b, int u) {  // tile row (r, b): columns 16 b .. 16 b + 15
      const v16f w = row16(tiles + b * nbytes, q0, *lanes, mask);
      for (int t = 0; t < NT; ++t) acc[t][u] += w * load16(zt + t * zs + 16 * b);
    };
    int64_t b = 0;
    for (; b + 2 <= nblk; b += 2) block(b, 0), block(b + 1, 1);  // constant indices: accumulators in registers
    if (b < nblk) block(b, 0);
    for (int t = 0; t < NT; ++t) {
      const v16f a = acc[t][0] + acc[t][1];
      float sum = 0;
      for (int i = 0; i < 16; ++i) sum += a[i];
      y[(t0 + t) * ys + r] = (mad != nullptr ? mad->scaled(sum) : sum) * scale[r];
    }
  }
#endif
};

#if defined(__AVX512BW__)
// One token through whole 16 x 16 tiles (k <= 3, the decode step), on CPUs with AVX512-VBMI and -VNNI (chosen at
// run time): one byte permute of the tile's stream makes the 64-bit windows (TrellisRows::window) of all 16
// rows, and per row one multishift cuts its 16 states out of the broadcast window; 1MAD sums the bytes of its
// LCG with one dot product. Each row keeps its own accumulator.
#define TILE_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni")))

struct TileControl {
  __m512i windows[2];  // byte indices into the stream: rows 0-7, rows 8-15 (qword i = row i's window, reversed)
  __m512i cut;         // multishift bit offsets: byte b of lane j from bit 48 - (j + 1) k + 8 b of the window
  explicit TileControl(int64_t k) {
    const int64_t nbytes = 32 * k;
    alignas(64) uint8_t w[2][64], c[64];
    for (int i = 0; i < 16; ++i)
      for (int t = 0; t < 8; ++t) w[i / 8][8 * (i % 8) + t] = (uint8_t)((2 * k * i - 2 + 7 - t + nbytes) % nbytes);
    for (int j = 0; j < 16; ++j)
      for (int b = 0; b < 4; ++b) c[4 * j + b] = (uint8_t)(48 - (j + 1) * k + 8 * b);
    std::memcpy(&windows, w, sizeof w), std::memcpy(&cut, c, sizeof c);
  }
};

template <bool MAD>
struct TrellisTiles {
  const float* z; float* y; const uint8_t* codes; int64_t nbytes, nblk, L; const float* values; const float* scale;
  const Mad* mad; const TileControl* ctl;

  TILE_TARGET void group(int64_t g) const {  // output rows 16 g .. 16 g + 15
    const __m512i mask = _mm512_set1_epi32((int)((1u << L) - 1));
    const __mmask64 keep = L > 8 ? 0x3333333333333333ull : 0x1111111111111111ull;  // the state's bytes per lane
    const __m512i mul = _mm512_set1_epi32((int)Mad::MUL), add = _mm512_set1_epi32((int)Mad::ADD);
    const __m512i ones = _mm512_set1_epi8(1), bias = _mm512_set1_epi32(-Mad::BIAS);
    const __mmask64 m0 = nbytes >= 64 ? ~0ull : (1ull << nbytes) - 1, m1 = nbytes > 64 ? (1ull << (nbytes - 64)) - 1 : 0;
    alignas(64) uint64_t window[16];
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const uint8_t* tile = codes + g * nblk * nbytes;
    for (int64_t b = 0; b < nblk; ++b, tile += nbytes) {
      const __m512i s0 = _mm512_maskz_loadu_epi8(m0, tile), s1 = _mm512_maskz_loadu_epi8(m1, tile + 64);
      _mm512_store_si512(window, _mm512_permutex2var_epi8(s0, ctl->windows[0], s1));
      _mm512_store_si512(window + 8, _mm512_permutex2var_epi8(s0, ctl->windows[1], s1));
      const __m512 x = _mm512_loadu_ps(z + 16 * b);
#pragma GCC unroll 16  // the accumulators stay in registers
      for (int i = 0; i < 16; ++i) {
        __m512i st = _mm512_maskz_multishift_epi64_epi8(keep, ctl->cut, _mm512_set1_epi64((long long)window[i]));
        if (L % 8) st = _mm512_and_si512(st, mask);
        __m512 w;
        if constexpr (MAD) {
          const __m512i lcg = _mm512_add_epi32(_mm512_mullo_epi32(st, mul), add);
          w = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(bias, lcg, ones));
        } else {
          w = _mm512_i32gather_ps(st, values, 4);
        }
        acc[i] = _mm512_fmadd_ps(w, x, acc[i]);
      }
    }
    for (int i = 0; i < 16; ++i) {
      const float sum = _mm512_reduce_add_ps(acc[i]);
      y[16 * g + i] = (MAD ? mad->scaled(sum) : sum) * scale[16 * g + i];
    }
  }
};

static bool has_tile_kernel() {
  static const bool yes = __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  return yes;
}
#endif

// ---- rotations (quant/incoherence.py), in place on each of T vectors of length n.
static void fwht(float* v, int64_t k2, int64_t m) {  // Sylvester order along the power-of-two axis, / sqrt(k2)
  // a butterfly pairs the contiguous runs [i, i + h) and [i + h, i + 2h) of m-float rows: one loop of h m
  for (int64_t h = 1; h < k2; h <<= 1)
    for (int64_t i = 0; i < k2; i += 2 * h) {
      float* a = v + i * m;
      float* b = a + h * m;
      for (int64_t k = 0; k < h * m; ++k) {
        const float p = a[k], q = b[k];
        a[k] = p + q;
        b[k] = p - q;
      }
    }
  const float s = 1.0f / std::sqrt((float)k2);
  for (int64_t i = 0; i < k2 * m; ++i) v[i] *= s;
}

// x[i * stride] (i < k) <- M x, given Mt = M^T (k x k row-major): a sum of rows of Mt (vectorizes, unlike
// dot products, whose float sums the compiler may not reorder).
static void small_matvec(float* x, int64_t k, int64_t stride, const float* Mt, float* tmp) {
  for (int64_t p = 0; p < k; ++p) tmp[p] = 0;
  for (int64_t q = 0; q < k; ++q) {
    const float xq = x[q * stride];
    const float* row = Mt + q * k;
    for (int64_t p = 0; p < k; ++p) tmp[p] += xq * row[p];
  }
  for (int64_t p = 0; p < k; ++p) x[p * stride] = tmp[p];
}

#if defined(__AVX512F__)
// small_matvec on `chunks` contiguous chunks of k = 16 (NV - 1) + 1 .. 16 NV floats (the Hadamard factors: 12,
// 20, 28, 36, ...): a chunk's output in NV registers, one broadcast and NV FMAs per input, so the work is
// vector-wide however small k is.
template <int NV>
static void chunk_matvecs(float* x, int64_t chunks, int64_t k, const float* Mt) {
  const __mmask16 last = (__mmask16)(0xffffu >> (16 * NV - k));
  for (int64_t c = 0; c < chunks; ++c, x += k) {
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t q = 0; q < k; ++q) {
      const __m512 xq = _mm512_set1_ps(x[q]);
      for (int v = 0; v < NV; ++v)
        acc[v] = _mm512_fmadd_ps(xq, _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, Mt + q * k + 16 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(x + 16 * v, v == NV - 1 ? last : 0xffff, acc[v]);
  }
}
#endif

// small_matvec on `chunks` contiguous chunks of k floats
static void chunks_matvec(float* x, int64_t chunks, int64_t k, const float* Mt, float* tmp) {
#if defined(__AVX512F__)
  switch ((k + 15) / 16) {
    case 1: return chunk_matvecs<1>(x, chunks, k, Mt);
    case 2: return chunk_matvecs<2>(x, chunks, k, Mt);
    case 3: return chunk_matvecs<3>(x, chunks, k, Mt);
    case 4: return chunk_matvecs<4>(x, chunks, k, Mt);
  }
#endif
  for (int64_t i = 0; i < chunks; ++i) small_matvec(x + i * k, k, 1, Mt, tmp);
}

static void permute(float* x, int64_t n, const at::Tensor& perm, float* tmp) {  // x <- x[perm]
  const int64_t* p = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) tmp[i] = x[p[i]];
  std::memcpy(x, tmp, n * sizeof(float));
}

static float* scratch(std::vector<float>& v, size_t n) {  // thread-local buffers reused across calls
  if (v.size() < n) v.resize(n);
  return v.data();
}

// sums[t * groups + g]: token t's inputs z summed over columns g span .. (g + 1) span (the last group may be
// shorter), in double: row kernels that leave a constant out of the per-weight loop subtract it times these
static void input_sums(const float* z, int64_t T, int64_t cols, int64_t span, int64_t groups, float* sums) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0;
      for (int64_t c = g * span; c < std::min(cols, (g + 1) * span); ++c) sum += z[t * cols + c];
      sums[t * groups + g] = (float)sum;
    }
}

Rotation::Rotation(int64_t kind_, int64_t n_, std::vector<at::Tensor> t) : kind(kind_), n(n_) {
  auto f = [](const at::Tensor& x) { return x.numel() ? x.to(at::kFloat).contiguous() : at::Tensor(); };
  auto i = [](const at::Tensor& x) { return x.numel() ? x.to(at::kLong).contiguous() : at::Tensor(); };
  auto tr = [](const at::Tensor& x) { return x.defined() ? x.transpose(-1, -2).contiguous() : x; };
  if (kind == 1) {
    TORCH_CHECK(t.size() == 2 && t[0].numel() == n, "hadamard: signs, H_m");
    signs = f(t[0]), H = f(t[1]), Ht = tr(H);
    TORCH_CHECK(!H.defined() || (H.dim() == 2 && n % H.size(0) == 0), "hadamard factor shape");
  } else if (kind == 2) {
    TORCH_CHECK(t.size() == 4, "butterfly: A, B, p_in, p_out");
    A = f(t[0]), B = f(t[1]), p_in = i(t[2]), p_out = i(t[3]), At = tr(A), Bt = tr(B);
    TORCH_CHECK(A.dim() == 3 && B.dim() == 3 && A.size(1) * B.size(1) == n, "butterfly factor shapes");
    if (p_in.defined()) inv_in = at::argsort(p_in);
    if (p_out.defined()) inv_out = at::argsort(p_out);
  }
}

void Rotation::apply(float* v, int64_t T, bool transpose) const {
  if (kind == 0) return;
  thread_local std::vector<float> tmp_buf;
  float* tmp = scratch(tmp_buf, 2 * n);  // a work row and a permutation buffer
  for (int64_t t = 0; t < T; ++t) {
    if (kind == 1)
      hadamard(v + t * n, transpose, tmp);
    else
      butterfly(v + t * n, transpose, tmp, tmp + n);
  }
}

void Rotation::hadamard(float* x, bool transpose, float* tmp) const {
  const float* s = signs.data_ptr<float>();
  const int64_t m = H.defined() ? H.size(0) : 1, k2 = n / m;
  if (!transpose) for (int64_t i = 0; i < n; ++i) x[i] *= s[i];
  if (transpose && m > 1) chunks_matvec(x, k2, m, H.data_ptr<float>(), tmp);
  fwht(x, k2, m);
  if (!transpose && m > 1) chunks_matvec(x, k2, m, Ht.data_ptr<float>(), tmp);
  if (transpose) for (int64_t i = 0; i < n; ++i) x[i] *= s[i];
}

void Rotation::butterfly(float* x, bool transpose, float* tmp, float* buf) const {
  const int64_t p1 = A.size(1), p2 = B.size(1);
  // R applies A then B (each given to small_matvec transposed); R^T applies B^T then A^T.
  const float *a = (transpose ? A : At).data_ptr<float>(), *b = (transpose ? B : Bt).data_ptr<float>();
  auto step_a = [&] {  // each p2 fibre j: x[:, j] <- A_j x[:, j]
    for (int64_t j = 0; j < p2; ++j) small_matvec(x + j, p1, p2, a + (A.size(0) > 1 ? j : 0) * p1 * p1, tmp);
  };
  auto step_b = [&] {  // each p1 fibre i: x[i, :] <- B_i x[i, :]
    for (int64_t i = 0; i < p1; ++i) small_matvec(x + i * p2, p2, 1, b + (B.size(0) > 1 ? i : 0) * p2 * p2, tmp);
  };
  if (!transpose) {
    if (p_in.defined()) permute(x, n, p_in, buf);
    step_a();
    step_b();
    if (p_out.defined()) permute(x, n, p_out, buf);
  } else {
    if (inv_out.defined()) permute(x, n, inv_out, buf);
    step_b();
    step_a();
    if (inv_in.defined()) permute(x, n, inv_in, buf);
  }
}

// Per-call glue stays off torch's dispatcher where it can: on tiny layers it costs more than the matmul.
static at::Tensor lookup(const py::dict& d, const py::str& key) {
  PyObject* o = PyDict_GetItem(d.ptr(), key.ptr());  // borrowed; null if absent
  return (o == nullptr || o == Py_None) ? at::Tensor() : py::handle(o).cast<at::Tensor>();
}

static at::Tensor dense(const at::Tensor& t) {
  return (!t.defined() || t.is_contiguous()) ? t : t.contiguous();
}

static at::Tensor f32(const at::Tensor& t) {  // no copy for the usual contiguous float32 CPU tensors
  return (!t.defined() || t.scalar_type() == at::kFloat) ? dense(t) : t.to(at::kFloat).contiguous();
}

static const float* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

Plan::Plan(int64_t rows_, int64_t cols_, int64_t in_, int64_t out_, int64_t codec_, int64_t wbits_, int64_t groupsize_,
           std::vector<int64_t> stage_bits_, std::vector<double> stage_scales_, at::Tensor values_, int64_t v_kind,
           std::vector<at::Tensor> v_factors, int64_t u_kind, std::vector<at::Tensor> u_factors)
    : rows(rows_), cols(cols_), in_features(in_), out_features(out_), codec(codec_), wbits(wbits_),
      groupsize(groupsize_), stage_bits(stage_bits_), stage_scales(stage_scales_), V(v_kind, cols_, v_factors),
      U(u_kind, rows_, u_factors) {
  TORCH_CHECK(tables_set, "set_tables first");
  TORCH_CHECK(codec != 0 || (wbits >= 2 && wbits <= 4) || wbits == 8, "grid codes of 2-4 or 8 bits");
  TORCH_CHECK(codec != 1 || (cols % 8 == 0 && stage_bits.size() == stage_scales.size()), "vector codebook layout");
  if (codec == 2) {  // stage_bits = [L, T], groupsize = tile rows
    TORCH_CHECK(stage_bits.size() == 2 && stage_bits[0] <= 16 && wbits >= 1 && wbits <= 6 && groupsize > 0 &&
                stage_bits[1] * wbits >= 64 &&
                groupsize * 16 == stage_bits[1] && rows % groupsize == 0 && cols % 16 == 0 &&
                (values_.numel() == (int64_t(1) << stage_bits[0]) ||
                 values_.numel() == (int64_t(2) << stage_bits[0])), "trellis layout");
    values = values_.to(at::kFloat).contiguous();
    vdim = values.numel() >> stage_bits[0];
    if (stage_scales.size() == 1 && vdim == 1) {  // 1MAD with 1 / RMS: computed in the kernel where it is exact
      mad_hi = (float)stage_scales[0], mad_lo = (float)(stage_scales[0] - (double)mad_hi);
      const Mad mad{mad_hi, mad_lo};
      const float* v = values.data_ptr<float>();
      inline_mad = true;
      for (int64_t st = 0; st < values.numel() && inline_mad; ++st) inline_mad = mad.value((uint32_t)st) == v[st];
    }
  }
  TORCH_CHECK(in_features <= cols && out_features <= rows, "shapes");
  for (size_t i = 0; i < stage_bits.size(); ++i) stage_keys.emplace_back("codes" + std::to_string(i));
}

PlanTensors Plan::bind(const py::dict& params, const py::dict& buffers) const {
  // interned once and never freed (a static py::object would be released after the interpreter ends)
  static const py::str &k_in = *new py::str("in_scale"), &k_out = *new py::str("out_scale"),
                       &k_bias = *new py::str("bias"), &k_scale = *new py::str("scale"),
                       &k_codes = *new py::str("codes"), &k_zero = *new py::str("zero");
  PlanTensors w;
  w.in_scale = f32(lookup(params, k_in)), w.out_scale = f32(lookup(params, k_out));
  w.bias = f32(lookup(params, k_bias)), w.scale = f32(lookup(params, k_scale));
  TORCH_CHECK(w.scale.defined(), "scale");
  if (codec == 0) {
    w.codes = dense(lookup(buffers, k_codes)), w.zero = f32(lookup(buffers, k_zero));
    TORCH_CHECK(w.codes.defined() && w.codes.scalar_type() == at::kByte && w.codes.dim() == 2 &&
                w.codes.size(0) == rows && w.codes.size(1) == (cols * wbits + 7) / 8, "grid codes");
    TORCH_CHECK(w.zero.defined() && w.zero.sizes() == w.scale.sizes() && w.scale.dim() == 2, "grid scale / zero");
  } else if (codec == 1) {
    TORCH_CHECK(w.scale.numel() == rows, "vector codebook scale");
    for (size_t i = 0; i < stage_bits.size(); ++i) {
      at::Tensor c = dense(lookup(buffers, stage_keys[i]));
      TORCH_CHECK(c.defined() && c.dim() == 2 && c.size(0) == rows && c.size(1) == cols / 8 &&
                  c.element_size() * 8 == stage_bits[i], "vector codes");
      w.stages.push_back(c);
    }
  } else {
    w.codes = dense(lookup(buffers, k_codes));
    TORCH_CHECK(w.scale.numel() == rows, "trellis scale");
    TORCH_CHECK(w.codes.defined() && w.codes.scalar_type() == at::kByte && w.codes.dim() == 3 &&
                w.codes.size(0) == rows / groupsize && w.codes.size(1) == cols / 16 &&
                w.codes.size(2) == stage_bits[1] * wbits / 8, "trellis codes");
  }
  return w;
}

void Plan::apply(const PlanTensors& w, const float* xp, int64_t T, float* op) const {
  const float *isp = ptr(w.in_scale), *osp = ptr(w.out_scale), *bp = ptr(w.bias), *sp = ptr(w.scale);
  thread_local std::vector<float> zbuf, tbuf;
  float *zp = scratch(zbuf, T * cols), *tp = scratch(tbuf, T * rows);
  std::fill(zp, zp + T * cols, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < in_features; ++i) {
      const float v = xp[t * in_features + i];
      zp[t * cols + i] = isp ? v * isp[i] : v;
    }
  V.apply(zp, T, false);

  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, cols * T));
  if (codec == 0) {
    const uint8_t* cp = w.codes.data_ptr<uint8_t>();
    const float* zr = ptr(w.zero);
    const int64_t nbytes = w.codes.size(1), ss = w.scale.size(0) > 1 ? w.scale.size(1) : 0, groups = w.scale.size(1);
    auto run = [&](auto g) {
      using G = decltype(g);
      each_row(G{zp, cols, T, tp, rows, cp, nbytes, cols, sp, zr, ss, groups, groupsize, 0}, rows, grain);
    };
    if (wbits == 2) run(GridRows<2>{});
    if (wbits == 3) run(GridRows<3>{});
    if (wbits == 4) run(GridRows<4>{});
    if (wbits == 8) {
      thread_local std::vector<float> xbuf;
      float* xs = scratch(xbuf, T * groups);
      input_sums(zp, T, cols, groups == 1 ? cols : groupsize, groups, xs);
      each_row(ByteRows{zp, cols, T, tp, rows, cp, cols, sp, zr, ss, groups, groupsize, xs, 0}, rows, grain);
    }
  } else if (codec == 1) {
    VectorRows v{zp, cols, T, tp, rows, {}, stage_bits, stage_scales, cols / 8, sp, 0};
    for (const auto& c : w.stages) v.codes.push_back(c.data_ptr());
    each_row_of_one_token(v, rows, grain);
  } else {
    const Mad mad{mad_hi, mad_lo};
#if defined(__AVX512BW__)
    if (T == 1 && groupsize == 16 && wbits <= 3 && vdim == 1 && has_tile_kernel()) {
      static const TileControl controls[3] = {TileControl(1), TileControl(2), TileControl(3)};
      auto run = [&](auto tiles) {
        at::parallel_for(0, rows / 16, std::max<int64_t>(1, grain / 16), [&](int64_t g0, int64_t g1) {
          for (int64_t g = g0; g < g1; ++g) tiles.group(g);
        });
      };
      const uint8_t* cp = w.codes.data_ptr<uint8_t>();
      const int64_t nbytes = w.codes.size(2), L = stage_bits[0];
      if (inline_mad)
        run(TrellisTiles<true>{zp, tp, cp, nbytes, cols / 16, L, nullptr, sp, &mad, &controls[wbits - 1]});
      else
        run(TrellisTiles<false>{zp, tp, cp, nbytes, cols / 16, L, values.data_ptr<float>(), sp, nullptr,
                                &controls[wbits - 1]});
    } else
#endif
    {
      const Lanes lanes(wbits, stage_bits[0]);
      float* zsum = nullptr;
#if defined(__AVX2__) && !defined(__AVX512F__)
      thread_local std::vector<float> zsum_buf;
      if (inline_mad) {
        zsum = scratch(zsum_buf, T);
        input_sums(zp, T, cols, cols, 1, zsum);
      }
#endif
      each_row_of_one_token(TrellisRows{zp, cols, T, tp, rows, w.codes.data_ptr<uint8_t>(), w.codes.size(2),
                                        cols / 16, groupsize, wbits, stage_bits[0], values.data_ptr<float>(), sp,
                                        inline_mad ? &mad : nullptr, zsum, &lanes, vdim == 2, 0},
                            rows, grain);
    }
  }
  U.apply(tp, T, true);

  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < out_features; ++i) {
      float v = tp[t * rows + i];
      if (osp) v *= osp[i];
      if (bp) v += bp[i];
      op[t * out_features + i] = v;
    }
}

// Called with x (T, in_features) float32 and the layer's _parameters and _buffers (looked up on every call,
// so that finetuned scales or moved buffers are always the current ones).
at::Tensor Plan::operator()(at::Tensor x, py::dict params, py::dict buffers) const {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x: (..., in_features) float32 on the CPU");
  x = dense(x);
  PlanTensors w = bind(params, buffers);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  auto y = at::empty(shape, x.options());
  apply(w, x.data_ptr<float>(), x.numel() / in_features, y.data_ptr<float>());
  return y;
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_tables", &set_tables, "E8P and E8 1-bit tables from quant.e8p");
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>,
                    std::vector<double>, at::Tensor, int64_t, std::vector<at::Tensor>, int64_t,
                    std::vector<at::Tensor>>())
      .def("__call__", &Plan::operator())
      .def_readonly("inline_mad", &Plan::inline_mad);
  register_decode(m);
}

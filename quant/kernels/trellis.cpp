// Viterbi search of quant.trellis.Trellis (QTIP's bitshift trellis) on the CPU: the forward pass and the
// traceback fused, S sequences at a time sharing every table load, groups threaded with
// at::parallel_for (torch's thread count). The code table comes from Python (Trellis.table and its squared
// norms); nothing about the codes is derived here. quant/trellis.py documents the trellis; this file only
// its layout.
//
// States are in natural order, s = b 2^kV + c (b the high L - kV bits, c the kV new bits). A step's cost of
// s is best[b] + |x_t - table[s]|^2 - |x_t|^2 = best[b] + norm[s] - 2 x_t . table[s]; the predecessors of
// the states b' 2^kV + c' are a 2^(L-kV) + b', a in [0, 2^kV), so the next step's best is the elementwise
// minimum of the 2^kV contiguous quarters (halves, ...) of the cost array: best'[b'] = min_a cost[a nb + b'],
// nb = 2^(L-kV). In a vector of W consecutive states, best[b] is one broadcast value when 2^kV >= W, else
// W / 2^kV values each repeated 2^kV times (one permute). The table is repacked per call so that the
// 2^kV predecessor vectors of each output vector lie one after another: one sequential stream.
//
// Only best per step is kept (2^(L-kV) floats); the traceback recomputes the 2^kV predecessor costs of the
// state it is at, with the same arithmetic as the forward pass (no backpointers: recording the argmin in
// the forward pass costs a compare and two blends per state vector, more than it saves).
//
// Vectors are GCC/Clang vector extensions of 16 floats with -mavx512f, else 8 (AVX2 + FMA with -mavx2
// -mfma, else SSE2 code); trellises with fewer than W groups (tiny L) run the same code on scalars.
// Registered as the operator torch.ops.rlo_trellis.viterbi (no Python bindings: torch's Python headers would
// take most of the build time).
#include <ATen/core/Tensor.h>  // and the one op used: not ATen/ATen.h, a third of the build to parse
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));

template <class F>
struct Lanes {
  static constexpr int n = VW;
};
template <>
struct Lanes<float> {
  static constexpr int n = 1;
};

template <class F>
static inline F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class F>
static inline void store(float* p, F v) {
  std::memcpy(p, &v, sizeof v);
}

static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline float vmin(float a, float b) { return a < b ? a : b; }

// a * b + c, fused wherever the CPU has FMA, for vectors and scalars alike (the traceback must recompute
// the forward pass's costs bit for bit); GCC does not reliably contract the vector expression itself.
static inline float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
static inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// A state's (or a vector of states') cost, (norm + best) - 2 x . table; xm = -2 x. The forward pass and
// the traceback both use this expression. Adding best first lets the add take its operand straight from
// memory (a broadcast load) and the FMAs accumulate in place: 4 instructions per vector of states.
template <class F, int V>
static inline F cost(F best, const F* tab, const F* xm) {
  F c = tab[0] + best;
  for (int v = 0; v < V; ++v) c = fmadd(xm[v], tab[1 + v], c);
  return c;
}

// A float in every lane. `F{} + s` would cost an add (of +0.0, which the compiler may not drop).
static inline vf broadcast(float s) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(s);
#elif defined(__AVX__)
  return (vf)_mm256_set1_ps(s);
#else
  vf v;
  for (int l = 0; l < VW; ++l) v[l] = s;
  return v;
#endif
}

struct Trellis {
  int L, kv, steps;
  int64_t nb, nc;
  const float* table;  // (2^L, V), natural order
  const float* norms;  // (2^L,)
};

// best[b] for the W states from s0 (a multiple of W): a broadcast when 2^kV >= W, else W / 2^kV values
// each repeated 2^kV times. hist rows are padded by W floats for the unaligned load.
template <class F>
static inline F best_of(const float* best, int64_t s0, const Trellis& tr, const vi& repeat) {
  if constexpr (Lanes<F>::n == 1) {
    return best[s0 >> tr.kv];
  } else {
    if (tr.nc >= VW) return broadcast(best[s0 >> tr.kv]);
    F v = load<F>(best + (s0 >> tr.kv));
#if defined(__GNUC__) && !defined(__clang__)
    return __builtin_shuffle(v, repeat);
#else
    F r;
    for (int l = 0; l < VW; ++l) r[l] = v[repeat[l]];
    return r;
#endif
  }
}

// The table repacked for the forward pass: for output vector j and a in [0, 2^kV), the W states a nb + j W
// as norm, table[:, 0], ..., table[:, V - 1] (W floats each).
template <class F, int V>
static std::vector<float> repack(const Trellis& tr) {
  constexpr int W = Lanes<F>::n;
  std::vector<float> P((int64_t(1) << tr.L) * (V + 1));
  float* p = P.data();
  for (int64_t j = 0; j < tr.nb / W; ++j)
    for (int64_t a = 0; a < tr.nc; ++a) {
      const int64_t s0 = a * tr.nb + j * W;
      for (int l = 0; l < W; ++l) p[l] = tr.norms[s0 + l];
      for (int v = 0; v < V; ++v)
        for (int l = 0; l < W; ++l) p[(1 + v) * W + l] = tr.table[(s0 + l) * V + v];
      p += (V + 1) * W;
    }
  return P;
}

// S sequences x[i] (steps V floats each): hist[i] rows 0..steps (stride `row`) get best before each step
// and, in row `steps`, the minimum over each end group; row 0 is the start (set by the caller).
// noinline: inlined into run's lambda it runs ~15% slower (measured; GCC spills the sequences' pointers)
template <class F, int V, int S>
__attribute__((noinline)) static void forward(const Trellis& tr, const float* P, const float* const* x, float* const* hist, int64_t row) {
  constexpr int W = Lanes<F>::n;
  vi repeat{};
  if constexpr (W > 1)
    for (int l = 0; l < W; ++l) repeat[l] = l >> tr.kv;
  const float inf = std::numeric_limits<float>::infinity();
  for (int t = 0; t < tr.steps; ++t) {
    F xm[S][V];
    for (int i = 0; i < S; ++i)
      for (int v = 0; v < V; ++v) xm[i][v] = F{} - 2.0f * x[i][t * V + v];
    const float* p = P;
    for (int64_t j = 0; j < tr.nb / W; ++j) {
      F acc[S];
      for (int i = 0; i < S; ++i) acc[i] = F{} + inf;
      for (int64_t a = 0; a < tr.nc; ++a, p += (V + 1) * W) {
        F tab[V + 1];
        for (int u = 0; u <= V; ++u) tab[u] = load<F>(p + u * W);
        const int64_t s0 = a * tr.nb + j * W;
        for (int i = 0; i < S; ++i)
          acc[i] = vmin(acc[i], cost<F, V>(best_of<F>(hist[i] + t * row, s0, tr, repeat), tab, xm[i]));
      }
      for (int i = 0; i < S; ++i) store<F>(hist[i] + (t + 1) * row + j * W, acc[i]);
    }
  }
}

// The states of `count` sequences from their forward pass, traced back in lockstep (their history reads
// miss the cache independently, so they overlap): the end group is the first minimum of the last row
// (or the overlap), then each step's state is its group's first cheapest predecessor.
template <int V, int S>
static void traceback(const Trellis& tr, const float* const* x, const float* const* hist, int64_t row,
                      const int64_t* overlap, int count, int64_t* const* states) {
  int64_t b[S];
  for (int i = 0; i < count; ++i) {
    b[i] = overlap ? overlap[i] : 0;
    if (overlap) continue;
    const float* last = hist[i] + tr.steps * row;
    for (int64_t k = 1; k < tr.nb; ++k)
      if (last[k] < last[b[i]]) b[i] = k;
  }
  for (int t = tr.steps - 1; t >= 0; --t)
    for (int i = 0; i < count; ++i) {
      float xm[V];
      for (int v = 0; v < V; ++v) xm[v] = -2.0f * x[i][t * V + v];
      int64_t best_s = b[i];
      float best_c = std::numeric_limits<float>::infinity();
      for (int64_t a = 0; a < tr.nc; ++a) {
        const int64_t s = a * tr.nb + b[i];
        float tab[V + 1] = {tr.norms[s]};
        for (int v = 0; v < V; ++v) tab[1 + v] = tr.table[s * V + v];
        const float c = cost<float, V>(hist[i][t * row + (s >> tr.kv)], tab, xm);
        if (c < best_c) best_c = c, best_s = s;
      }
      states[i][t] = best_s;
      b[i] = best_s >> tr.kv;
    }
}

template <class F, int V, int S>
static void run(const Trellis& tr, const float* X, const int64_t* overlap, int64_t n, int64_t* out) {
  constexpr int W = Lanes<F>::n;
  const std::vector<float> P = repack<F, V>(tr);
  const int64_t row = tr.nb + W, groups = (n + S - 1) / S;
  const size_t hist_floats = size_t(S) * (tr.steps + 1) * row;
  const float inf = std::numeric_limits<float>::infinity();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    // tens of MB per thread, kept across calls: a fresh allocation page-faults all of it on every call
    thread_local std::unique_ptr<float[]> hist;
    thread_local size_t hist_size = 0;
    if (hist_size < hist_floats) hist.reset(new float[hist_floats]), hist_size = hist_floats;
    for (int64_t g = g0; g < g1; ++g) {
      const float* x[S];
      float* h[S];
      int64_t* st[S];
      int64_t ov[S];
      const int count = int(std::min<int64_t>(S, n - g * S));
      for (int i = 0; i < S; ++i) {
        const int64_t seq = g * S + std::min(i, count - 1);  // a short last group repeats its last sequence
        x[i] = X + seq * tr.steps * V;
        h[i] = hist.get() + i * (tr.steps + 1) * row;
        st[i] = out + seq * tr.steps;
        ov[i] = overlap ? overlap[seq] : -1;
        for (int64_t b = 0; b < row; ++b) h[i][b] = overlap && b != ov[i] ? inf : 0.0f;
      }
      forward<F, V, S>(tr, P.data(), x, h, row);
      traceback<V, S>(tr, x, h, row, overlap ? ov : nullptr, count, st);
    }
  });
}

// Trellis.viterbi: X (n, steps V) float32, table (2^L, V) float32, norms (2^L,) float32, overlap (n,) int64
// or empty (free start and end) -> states (n, steps) int64.
at::Tensor viterbi(at::Tensor X, at::Tensor table, at::Tensor norms, int64_t L, int64_t kv,
                      at::Tensor overlap, int64_t group) {
  TORCH_CHECK(X.dim() == 2 && X.scalar_type() == at::kFloat && X.is_contiguous(), "X: contiguous float32 (n, m V)");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == (int64_t(1) << L) && table.scalar_type() == at::kFloat
              && table.is_contiguous(), "table: contiguous float32 (2^L, V)");
  TORCH_CHECK(norms.numel() == table.size(0) && norms.scalar_type() == at::kFloat && norms.is_contiguous(),
              "norms: contiguous float32 (2^L,)");
  const int V = table.size(1);
  TORCH_CHECK((V == 1 || V == 2) && kv >= 1 && 2 * kv <= L && L <= 24 && X.size(1) % V == 0, "trellis shape");
  const int64_t n = X.size(0);
  const bool constrained = overlap.numel() > 0;
  TORCH_CHECK(!constrained || (overlap.numel() == n && overlap.scalar_type() == at::kLong && overlap.is_contiguous()),
              "overlap: contiguous int64 (n,) or empty");
  Trellis tr{int(L), int(kv), int(X.size(1) / V), int64_t(1) << (L - kv), int64_t(1) << kv,
             table.data_ptr<float>(), norms.data_ptr<float>()};
  if (constrained) {
    const int64_t* o = overlap.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(o[i] >= 0 && o[i] < tr.nb, "overlap out of range");
  }
  auto out = at::empty({n, tr.steps}, at::kLong);
  if (!n || !tr.steps) return out;
  const float* x = X.data_ptr<float>();
  const int64_t* o = constrained ? overlap.data_ptr<int64_t>() : nullptr;
  int64_t* s = out.data_ptr<int64_t>();
  const bool vec = tr.nb >= VW;
#define RUN(Vv, Sv) (vec ? run<vf, Vv, Sv>(tr, x, o, n, s) : run<float, Vv, Sv>(tr, x, o, n, s))
  if (V == 1) {
    if (group == 1) RUN(1, 1); else if (group == 2) RUN(1, 2); else if (group == 8) RUN(1, 8); else RUN(1, 4);
  } else {
    if (group == 1) RUN(2, 1); else if (group == 2) RUN(2, 2); else if (group == 8) RUN(2, 8); else RUN(2, 4);
  }
#undef RUN
  return out;
}

// Trellis.viterbi (quant/trellis.py): best state paths of S sequences at a time
TORCH_LIBRARY(rlo_trellis, m) { m.def("viterbi", &viterbi); }

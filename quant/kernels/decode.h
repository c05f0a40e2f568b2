// One decoding step of a Llama-style decoder (Llama, SmolLM2, Mistral, Qwen2: RMSNorm, RoPE, grouped-query
// attention, SwiGLU MLP, pre-norm residuals) in one call: the token's embedding, every layer against a
// preallocated KV cache, the final norm, the LM head and the greedy argmax. Packed linears run their Plan
// (packed.cpp) on the weights' own buffers; dense ones a matvec over float32, float16 or bfloat16 weights. lm/decode.py
// checks the model, fills the cache from a batched prefill and drives it.
//
// The numerics follow transformers' eager forward in float32: RMSNorm as x * rsqrt(mean(x^2) + eps) * w, the
// model's own rotary cos/sin table (given, so every RoPE variant transformers computes is covered), softmax
// over scaled q.k in float32, silu(gate) * up. Sums run in another order than torch's, so logits agree to
// rounding, not bit for bit.
//
// A header of packed.cpp, not a second source file: the extension compiles as one unit, as torch's Python
// headers, which both need, take most of a unit's build time.
#pragma once
#include "packed.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

typedef uint16_t vnh __attribute__((vector_size(2 * NW)));
typedef uint32_t vnu __attribute__((vector_size(4 * NW)));

static inline vnf loadn(const at::BFloat16* p) {  // bfloat16 is the high half of a float32
  vnh h;
  std::memcpy(&h, p, sizeof h);
  return (vnf)(__builtin_convertvector(h, vnu) << 16);
}

static inline vnf loadn(const at::Half* p) {
#if defined(__AVX512F__)
  return (vnf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__F16C__)
  return (vnf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
  vnf v;
  for (int i = 0; i < NW; ++i) v[i] = (float)p[i];
  return v;
#endif
}

// y[r] = W[r] . x (+ bias[r]) for W (rows, cols) row-major, one row after another with two accumulators: a
// single sequential stream of weights reads about twice as fast here as 2-8 rows interleaved.
template <class Wt>
static void matvec(const Wt* W, const float* x, float* y, int64_t rows, int64_t cols, const float* bias) {
  const int64_t grain = std::max<int64_t>(4, (1 << 16) / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Wt* w = W + r * cols;
      vnf a0 = {}, a1 = {};
      int64_t c = 0;
      for (; c + 2 * NW <= cols; c += 2 * NW) {
        a0 += loadn(w + c) * loadn(x + c);
        a1 += loadn(w + c + NW) * loadn(x + c + NW);
      }
      float s = hsumn(a0 + a1);
      for (; c < cols; ++c) s += (float)w[c] * x[c];
      y[r] = bias ? s + bias[r] : s;
    }
  });
}

// A linear layer of the decoder: a packed QuantLinear's Plan bound to its tensors, or a dense weight.
struct Linear {
  const Plan* plan = nullptr;
  PlanTensors tensors;
  at::Tensor weight, bias;  // dense: (out, in) float32, float16 or bfloat16, optional float32 bias
  int64_t in = 0, out = 0;

  void operator()(const float* x, float* y) const {
    const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
    if (plan != nullptr)
      plan->apply(tensors, x, 1, y);
    else if (weight.scalar_type() == at::kBFloat16)
      matvec(weight.data_ptr<at::BFloat16>(), x, y, out, in, b);
    else if (weight.scalar_type() == at::kHalf)
      matvec(weight.data_ptr<at::Half>(), x, y, out, in, b);
    else
      matvec(weight.data_ptr<float>(), x, y, out, in, b);
  }
};

static bool floating(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

enum Part { MATMUL, ATTENTION, HEAD, OTHER, PARTS };

struct Decoder {
  enum { Q, K, V, O, GATE, UP, DOWN, PER_LAYER };
  int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, max_len;
  double eps, scaling;
  std::vector<Linear> lin;  // PER_LAYER per layer, then the head
  std::vector<at::Tensor> norms;  // input and post-attention norm of each layer, then the final norm
  at::Tensor cos, sin;  // (max_len, head_dim) rotary tables
  at::Tensor kcache, vcache;  // (layers, kv_heads, max_len, head_dim)
  // token embedding: dense (vocab, hidden) table, or a grid QuantLinear's codes decoded row by row
  at::Tensor embed, e_codes, e_scale, e_zero, e_in, e_out;
  int64_t e_bits = 0, e_groupsize = -1;
  at::Tensor logits;
  std::vector<float> x, h, t, q, k, v, att, g, u, scores;
  bool profiling = false;
  double seconds[PARTS] = {};

  Decoder(int64_t layers_, int64_t hidden_, int64_t heads_, int64_t kv_heads_, int64_t head_dim_, int64_t inter_,
          int64_t vocab_, int64_t max_len_, double eps_, double scaling_, at::Tensor cos_, at::Tensor sin_)
      : layers(layers_), hidden(hidden_), heads(heads_), kv_heads(kv_heads_), head_dim(head_dim_), inter(inter_),
        vocab(vocab_), max_len(max_len_), eps(eps_), scaling(scaling_) {
    TORCH_CHECK(heads % kv_heads == 0 && head_dim % 2 == 0, "grouped-query attention layout");
    cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
    TORCH_CHECK(cos.sizes() == at::IntArrayRef({max_len, head_dim}) && sin.sizes() == cos.sizes(), "rotary tables");
    lin.resize(layers * PER_LAYER + 1);
    norms.resize(2 * layers + 1);
    kcache = at::zeros({layers, kv_heads, max_len, head_dim});
    vcache = at::zeros({layers, kv_heads, max_len, head_dim});
    logits = at::empty({vocab});
    x.resize(hidden), h.resize(hidden), t.resize(std::max(hidden, heads * head_dim));
    q.resize(heads * head_dim), k.resize(kv_heads * head_dim), v.resize(kv_heads * head_dim);
    att.resize(heads * head_dim), g.resize(inter), u.resize(inter), scores.resize(heads * max_len);
  }

  void check_slot(int64_t slot, int64_t in, int64_t out) const {
    TORCH_CHECK(slot >= 0 && slot < (int64_t)lin.size(), "linear slot");
    const int64_t j = slot % PER_LAYER, qd = heads * head_dim, kd = kv_heads * head_dim;
    const int64_t want_in = slot == layers * PER_LAYER ? hidden : j == O ? qd : j == DOWN ? inter : hidden;
    const int64_t want_out = slot == layers * PER_LAYER ? vocab
                           : j == Q ? qd : (j == K || j == V) ? kd : (j == GATE || j == UP) ? inter : hidden;
    TORCH_CHECK(in == want_in && out == want_out, "linear ", slot, ": ", out, "x", in, ", expected ", want_out, "x",
                want_in);
  }

  void set_dense(int64_t slot, at::Tensor weight, at::Tensor bias) {
    TORCH_CHECK(weight.dim() == 2 && floating(weight), "dense weights: 2-D float32, float16 or bfloat16");
    check_slot(slot, weight.size(1), weight.size(0));
    Linear& l = lin[slot];
    l.plan = nullptr, l.weight = weight.contiguous(), l.in = weight.size(1), l.out = weight.size(0);
    l.bias = bias.numel() ? bias.to(at::kFloat).contiguous() : at::Tensor();
  }

  void set_packed(int64_t slot, const Plan& plan, py::dict params, py::dict buffers) {
    check_slot(slot, plan.in_features, plan.out_features);
    Linear& l = lin[slot];
    l.plan = &plan, l.tensors = plan.bind(params, buffers), l.in = plan.in_features, l.out = plan.out_features;
    l.weight = at::Tensor(), l.bias = at::Tensor();
  }

  void set_norm(int64_t i, at::Tensor w) {
    TORCH_CHECK(i >= 0 && i <= 2 * layers && w.numel() == hidden, "norm");
    norms[i] = w.to(at::kFloat).contiguous();
  }

  void set_embedding(at::Tensor table) {
    TORCH_CHECK(table.dim() == 2 && table.size(0) == vocab && table.size(1) == hidden && floating(table),
                "embedding table");
    embed = table.contiguous(), e_bits = 0;
  }

  // quant.embedding.QuantEmbedding: row = scale * (code - zero) [* in_scale] [* out_scale[row]]
  void set_grid_embedding(at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t bits,
                          int64_t groupsize, at::Tensor in_scale, at::Tensor out_scale) {
    TORCH_CHECK((bits == 4 || bits == 8) && codes.scalar_type() == at::kByte && codes.size(0) == vocab &&
                codes.size(1) == (hidden * bits + 7) / 8 && scale.dim() == 2 && zero.sizes() == scale.sizes(),
                "grid embedding layout");
    e_codes = codes.contiguous(), e_scale = scale.to(at::kFloat).contiguous();
    e_zero = zero.to(at::kFloat).contiguous(), e_bits = bits, e_groupsize = groupsize;
    e_in = in_scale.numel() ? in_scale.to(at::kFloat).contiguous() : at::Tensor();
    e_out = out_scale.numel() ? out_scale.to(at::kFloat).contiguous() : at::Tensor();
    embed = at::Tensor();
  }

  // The prompt's keys (after RoPE) and values of layer l, (kv_heads, n, head_dim), at positions 0..n-1.
  void set_cache(int64_t l, at::Tensor keys, at::Tensor values) {
    TORCH_CHECK(l >= 0 && l < layers && keys.dim() == 3 && keys.size(0) == kv_heads && keys.size(2) == head_dim &&
                keys.size(1) <= max_len && values.sizes() == keys.sizes(), "cache layout");
    const int64_t n = keys.size(1);
    kcache[l].narrow(1, 0, n).copy_(keys);
    vcache[l].narrow(1, 0, n).copy_(values);
  }

  void embed_row(int64_t token) {
    float* xp = x.data();
    if (e_bits == 0) {
      if (embed.scalar_type() == at::kBFloat16) {
        const at::BFloat16* row = embed.data_ptr<at::BFloat16>() + token * hidden;
        for (int64_t i = 0; i < hidden; ++i) xp[i] = (float)row[i];
      } else if (embed.scalar_type() == at::kHalf) {
        const at::Half* row = embed.data_ptr<at::Half>() + token * hidden;
        for (int64_t i = 0; i < hidden; ++i) xp[i] = (float)row[i];
      } else {
        std::memcpy(xp, embed.data_ptr<float>() + token * hidden, hidden * sizeof(float));
      }
      return;
    }
    const uint8_t* row = e_codes.data_ptr<uint8_t>() + token * e_codes.size(1);
    const int64_t srow = e_scale.size(0) > 1 ? token : 0, groups = e_scale.size(1);
    const float *sc = e_scale.data_ptr<float>() + srow * groups, *ze = e_zero.data_ptr<float>() + srow * groups;
    for (int64_t i = 0; i < hidden; ++i) {
      const int64_t gi = groups == 1 ? 0 : i / e_groupsize;
      const int code = e_bits == 8 ? row[i] : (row[i / 2] >> (4 * (i % 2))) & 15;
      float w = sc[gi] * ((float)code - ze[gi]);
      if (e_in.defined()) w *= e_in.data_ptr<float>()[i];
      if (e_out.defined()) w *= e_out.data_ptr<float>()[token];
      xp[i] = w;
    }
  }

  void rmsnorm(const float* in, const at::Tensor& w, float* out) const {
    float ss = 0;
    for (int64_t i = 0; i < hidden; ++i) ss += in[i] * in[i];
    const float r = 1.0f / std::sqrt(ss / (float)hidden + (float)eps);
    const float* wp = w.data_ptr<float>();
    for (int64_t i = 0; i < hidden; ++i) out[i] = wp[i] * (in[i] * r);
  }

  // rotate_half convention: pairs (i, i + head_dim / 2)
  void rope(float* vec, int64_t n_heads, int64_t pos) const {
    const float *c = cos.data_ptr<float>() + pos * head_dim, *s = sin.data_ptr<float>() + pos * head_dim;
    const int64_t half = head_dim / 2;
    for (int64_t hd = 0; hd < n_heads; ++hd) {
      float* p = vec + hd * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = p[i], b = p[i + half];
        p[i] = a * c[i] - b * s[i];
        p[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }

  void attention(int64_t l, int64_t pos) {
    const int64_t group = heads / kv_heads, n = pos + 1;
    const float* K = kcache.data_ptr<float>() + l * kv_heads * max_len * head_dim;
    const float* Vc = vcache.data_ptr<float>() + l * kv_heads * max_len * head_dim;
    at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t hd = h0; hd < h1; ++hd) {
        const float* qh = q.data() + hd * head_dim;
        const float* kh = K + (hd / group) * max_len * head_dim;
        const float* vh = Vc + (hd / group) * max_len * head_dim;
        float* sc = scores.data() + hd * max_len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          float d = 0;
          for (int64_t i = 0; i < head_dim; ++i) d += qh[i] * kh[j * head_dim + i];
          sc[j] = d * (float)scaling;
          mx = std::max(mx, sc[j]);
        }
        float total = 0;
        for (int64_t j = 0; j < n; ++j) total += (sc[j] = std::exp(sc[j] - mx));
        float* o = att.data() + hd * head_dim;
        std::fill(o, o + head_dim, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float p = sc[j] / total;
          for (int64_t i = 0; i < head_dim; ++i) o[i] += p * vh[j * head_dim + i];
        }
      }
    });
  }

  template <class F>
  inline void timed(Part part, F f) {
    if (!profiling) return f();
    auto t0 = std::chrono::steady_clock::now();
    f();
    seconds[part] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  // Runs token `token` at position `pos` (the cache holds positions 0..pos-1) and returns the greedy next
  // token; the logits stay in `logits`.
  int64_t step(int64_t token, int64_t pos) {
    TORCH_CHECK(token >= 0 && token < vocab && pos >= 0 && pos < max_len, "token or position out of range");
    for (const auto& l : lin) TORCH_CHECK(l.plan != nullptr || l.weight.defined(), "every linear must be set");
    TORCH_CHECK(embed.defined() || e_bits, "embedding not set");
    pybind11::gil_scoped_release no_gil;
    timed(OTHER, [&] { embed_row(token); });
    for (int64_t l = 0; l < layers; ++l) {
      const Linear* L = lin.data() + l * PER_LAYER;
      timed(OTHER, [&] { rmsnorm(x.data(), norms[2 * l], h.data()); });
      timed(MATMUL, [&] {
        L[Q](h.data(), q.data());
        L[K](h.data(), k.data());
        L[V](h.data(), v.data());
      });
      timed(ATTENTION, [&] {
        rope(q.data(), heads, pos);
        rope(k.data(), kv_heads, pos);
        float* kc = kcache.data_ptr<float>() + l * kv_heads * max_len * head_dim;
        float* vc = vcache.data_ptr<float>() + l * kv_heads * max_len * head_dim;
        for (int64_t j = 0; j < kv_heads; ++j) {
          std::memcpy(kc + (j * max_len + pos) * head_dim, k.data() + j * head_dim, head_dim * sizeof(float));
          std::memcpy(vc + (j * max_len + pos) * head_dim, v.data() + j * head_dim, head_dim * sizeof(float));
        }
        attention(l, pos);
      });
      timed(MATMUL, [&] { L[O](att.data(), t.data()); });
      timed(OTHER, [&] {
        for (int64_t i = 0; i < hidden; ++i) x[i] += t[i];
        rmsnorm(x.data(), norms[2 * l + 1], h.data());
      });
      timed(MATMUL, [&] {
        L[GATE](h.data(), g.data());
        L[UP](h.data(), u.data());
      });
      timed(OTHER, [&] {
        for (int64_t i = 0; i < inter; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
      });
      timed(MATMUL, [&] { L[DOWN](g.data(), t.data()); });
      timed(OTHER, [&] { for (int64_t i = 0; i < hidden; ++i) x[i] += t[i]; });
    }
    int64_t best = 0;
    timed(HEAD, [&] {
      rmsnorm(x.data(), norms[2 * layers], h.data());
      float* lp = logits.data_ptr<float>();
      lin[layers * PER_LAYER](h.data(), lp);
      for (int64_t i = 1; i < vocab; ++i)
        if (lp[i] > lp[best]) best = i;  // the first maximum, as torch.argmax
    });
    return best;
  }

  py::dict profile(bool reset) {
    py::dict d;
    const char* names[PARTS] = {"matmul", "attention", "head", "other"};
    for (int i = 0; i < PARTS; ++i) {
      d[names[i]] = seconds[i];
      if (reset) seconds[i] = 0;
    }
    return d;
  }
};

void register_decode(py::module& m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, double,
                    at::Tensor, at::Tensor>())
      .def("set_dense", &Decoder::set_dense)
      .def("set_packed", &Decoder::set_packed, py::keep_alive<1, 3>())
      .def("set_norm", &Decoder::set_norm)
      .def("set_embedding", &Decoder::set_embedding)
      .def("set_grid_embedding", &Decoder::set_grid_embedding)
      .def("set_cache", &Decoder::set_cache)
      .def("step", &Decoder::step)
      .def_readonly("logits", &Decoder::logits)
      .def_readwrite("profiling", &Decoder::profiling)
      .def("profile", &Decoder::profile, py::arg("reset") = false);
}

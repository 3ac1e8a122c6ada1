/* matformer::decode_step: one whole decoding step of a Llama-type MatFormerLM for one sequence
 * (one token, or a verify of up to 8), on one CPU thread (see decode_step.py, which collects the tensors from the model at
 * its active widths and says which models this covers).
 *
 * Why: in the compiled step the products already stream at the memory's rate (row_kernel.cpp),
 * and what is left is everything between them: the compiled graph's Python wrapper, an operator
 * call per product, a kernel launch per norm, rotary embedding, cast and residual add, dynamo's
 * guards. At the 41.7M benchmark size that is 0.7-0.9 ms of a 4.3-5 ms float16 step, and most of
 * a small tier's step. Here the whole step is one call: the same products and attention, the
 * rest as plain loops over vectors that stay in the cache.
 *
 * Numerics follow the model's eager forward: activations are rounded to the model's dtype where
 * the model stores them in it (norm outputs, products, attention output, residual stream),
 * products and attention sum in float32 (as the compiled step does). */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

#include "cpu_simd.h"

namespace {

/* The tensors of one layer, in this order, each as decode_step.py lists them (an absent one is
 * an empty tensor). Norm weights, biases and the rotary tables are float32 copies; the
 * projections and the cache are the model's own tensors in its dtype. */
enum Slot { IN_NORM, WQ, WK, WV, BQ, BK, BV, Q_NORM, K_NORM, WO, BO, POST_NORM, GATE, UP, DOWN,
            CACHE_K, CACHE_V, SLOTS };
enum Global { EMBED, FINAL_NORM, LM_HEAD, COS, SIN, GLOBALS };
enum Act { SILU, GELU, GELU_TANH, RELU };
constexpr int64_t MAX_ROWS = 8; /* tokens of one call: a step, or a verify of up to 7 drafts */

/* Storage on 64-byte boundaries, for the buffers the products read their input rows from and
 * write their outputs to: a vector load that straddles two cache lines costs two. The buffers
 * were std::vectors on malloc's 16-byte boundaries, so whether a process's were aligned was
 * chance: the 41.7M float32 model's 5-token verify ran its gate and up products in 8.6 ms
 * where they ran in 4.8 with aligned inputs (the verify 13.6 against 8.9 ms), in about one
 * process in three. Rows within a buffer stay aligned where the widths are multiples of 16. */
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U> &) {}
  T *allocate(size_t n) {
    return static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T *p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U> &) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U> &) const { return false; }
};
using Buffer = std::vector<float, Aligned64<float>>;

/* Values of the model's dtype held in float32: rounding to it where the model would store it. */
static void round_to(at::ScalarType dt, float *v, int64_t n) {
  if (dt == at::kHalf) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) STORE(v + i, VIA_F16(LOAD_X(v + i)));
    for (; i < n; i++) v[i] = _cvtsh_ss(_cvtss_sh(v[i], 0));
  } else if (dt == at::kBFloat16) {
    for (int64_t i = 0; i < n; i++) {  /* round to nearest even, as PyTorch (NaN kept a NaN) */
      uint32_t u;
      __builtin_memcpy(&u, v + i, 4);
      if ((u & 0x7fffffffu) > 0x7f800000u) continue;
      u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
      __builtin_memcpy(v + i, &u, 4);
    }
  }
}

static inline float load_one(at::ScalarType dt, const void *p, int64_t i) {
  switch (dt) {
    case at::kHalf: return f32_of_f16(static_cast<const uint16_t *>(p)[i]);
    case at::kBFloat16: return f32_of_bf16(static_cast<const uint16_t *>(p)[i]);
    default: return static_cast<const float *>(p)[i];
  }
}

/* v (already rounded to the dtype) stored into the cache's dtype: exact. */
static inline void store_one(at::ScalarType dt, void *p, int64_t i, float v) {
  if (dt == at::kFloat) {
    static_cast<float *>(p)[i] = v;
  } else {
    uint32_t u;
    __builtin_memcpy(&u, &v, 4);
    static_cast<uint16_t *>(p)[i] = dt == at::kHalf ? _cvtss_sh(v, 0) : (uint16_t)(u >> 16);
  }
}

/* R rows at once (a verify): sum_k w[n * ldw + k] * x[t * ldx + k] for every n and t. Each
 * weight vector is loaded and converted once and multiplied into every row's two accumulators,
 * so the weights are read once for all R rows; row t's sum goes to y[t * ldy + n]. */
template <int R, typename T, vec (*LOAD)(const T *), float (*ONE)(T)>
static void rows_multi(const T *w, int64_t ldw, const float *x, int64_t ldx, float *y,
                       int64_t out, int64_t k, int64_t ldy) {
  const int64_t step = 2 * LANES, body = k - k % step;
  for (int64_t n = 0; n < out; n++) {
    const T *r = w + n * ldw, *end = r + body;
    if (out - n <= AHEAD_ROWS) next_weight(w + (out - 1) * ldw + k, out - n);
    const float *q[R];
    vec a[R], b[R];
    for (int t = 0; t < R; t++) q[t] = x + t * ldx, a[t] = ZERO(), b[t] = ZERO();
    for (; r < end; r += step) {
      const vec w0 = LOAD(r), w1 = LOAD(r + LANES);
      for (int t = 0; t < R; t++) {
        a[t] = FMA(w0, LOAD_X(q[t]), a[t]);
        b[t] = FMA(w1, LOAD_X(q[t] + LANES), b[t]);
        q[t] += step;
      }
    }
    for (int t = 0; t < R; t++) {
      float s = SUM(ADD(a[t], b[t]));
      for (int64_t i = body; i < k; i++) s += ONE(r[i - body]) * x[t * ldx + i];
      y[t * ldy + n] = s;
    }
  }
}

/* R rows by NR weight rows at a time, one accumulator for each pair: each input vector is loaded
 * once for NR weight rows. For long weight rows, whose R inputs do not stay in the L1 cache,
 * rows_multi reloads them from L2 for every weight row; a standalone test on the development
 * CPU (a 171 MB float32 weight with rows of 4096) read 9.6-12.7 GB/s that way with 2-5 rows and
 * 17-19 GB/s with NR = 4. With short rows it is the other way round (rows of 512: 20-21 against
 * 9-13 GB/s), hence `rows_of`'s choice. NR is as large as NR * R + R + 1 vectors fit AVX-512's
 * 32 registers (AVX-512 only): loading each input vector once for more weight rows read the
 * (512, 4096) down projections of the 41.7M model's six layers, between its other weights, at
 * 3-6% less time for the whole 3-row product sequence than NR = 4 (float32 and float16,
 * interleaved medians of 40 in a standalone test; 1 row tiled is slower there than `rows_f32`). */
template <int R, int NR, typename T, vec (*LOAD)(const T *), float (*ONE)(T)>
static void rows_tiled(const T *w, int64_t ldw, const float *x, float *y, int64_t out, int64_t k) {
  const int64_t body = k - k % LANES;
  int64_t n = 0;
  for (; n + NR <= out; n += NR) {
    if (out - n <= AHEAD_ROWS) next_weight(w + (out - 1) * ldw + k, out - n);
    vec a[NR][R];
    for (int j = 0; j < NR; j++)
      for (int t = 0; t < R; t++) a[j][t] = ZERO();
    const T *r = w + n * ldw;
    for (int64_t c = 0; c < body; c += LANES) {
      vec xv[R];
      for (int t = 0; t < R; t++) xv[t] = LOAD_X(x + t * k + c);
      for (int j = 0; j < NR; j++) {
        const vec wv = LOAD(r + j * ldw + c);
        for (int t = 0; t < R; t++) a[j][t] = FMA(wv, xv[t], a[j][t]);
      }
    }
    for (int j = 0; j < NR; j++)
      for (int t = 0; t < R; t++) {
        float s = SUM(a[j][t]);
        for (int64_t i = body; i < k; i++) s += ONE(r[j * ldw + i]) * x[t * k + i];
        y[t * out + n + j] = s;
      }
  }
  if (n < out) rows_multi<R, T, LOAD, ONE>(w + n * ldw, ldw, x, k, y + n, out - n, k, out);
}

constexpr int64_t L1_INPUT_BYTES = 16384;
/* Inputs up to this size (R rows of k floats) stay in the L1 cache while rows_multi streams a
 * weight past them (the standalone test's crossover: rows of 1024 with 3 rows, 12 KB, read
 * 17.2 GB/s against 15.1 tiled; with 5, 20 KB, 11.1 against 15.5). */

template <typename T, vec (*LOAD)(const T *), float (*ONE)(T)>
static void rows_of(const T *w, int64_t ldw, const float *x, float *y, int64_t rows, int64_t out,
                    int64_t k) {
#if LANES == 16
  if (rows * k * (int64_t)sizeof(float) > L1_INPUT_BYTES) {
    switch (rows) {
#define CASE(R, NR) case R: return rows_tiled<R, NR, T, LOAD, ONE>(w, ldw, x, y, out, k);
      CASE(2, 8) CASE(3, 8) CASE(4, 6) CASE(5, 5) CASE(6, 4) CASE(7, 3) CASE(8, 2)
#undef CASE
    }
  }
#endif
  switch (rows) {
#define CASE(R) case R: rows_multi<R, T, LOAD, ONE>(w, ldw, x, k, y, out, k, out); break;
    CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    default: TORCH_CHECK(false, "decode_step: 1 to ", MAX_ROWS, " rows");
  }
}

/* y (rows, out) = x (rows, in) w^T (+ bias), rounded to the dtype: w (out, in) with unit stride
 * along in. One row: the one-row kernels of cpu_simd.h. */
static void product(const at::Tensor &w, const at::Tensor &bias, const float *x, float *y,
                    int64_t rows) {
  const int64_t out = w.size(0), k = w.size(1), ldw = w.stride(0);
  const void *wp = w.const_data_ptr();
  const uint16_t *half = static_cast<const uint16_t *>(wp);
  const float *single = static_cast<const float *>(wp);
  switch (w.scalar_type()) {
    case at::kHalf:
      if (rows == 1) rows_f16(half, ldw, x, y, out, k);
      else rows_of<uint16_t, load_f16, f32_of_f16>(half, ldw, x, y, rows, out, k);
      break;
    case at::kBFloat16:
      if (rows == 1) rows_bf16(half, ldw, x, y, out, k);
      else rows_of<uint16_t, load_bf16, f32_of_bf16>(half, ldw, x, y, rows, out, k);
      break;
    default:
      if (rows == 1) rows_f32(single, ldw, x, y, out, k);
      else rows_of<float, load_f32, f32_of_f32>(single, ldw, x, y, rows, out, k);
  }
  if (bias.defined() && bias.numel()) {
    const float *b = bias.const_data_ptr<float>();
    for (int64_t t = 0; t < rows; t++)
      for (int64_t i = 0; i < out; i++) y[t * out + i] += b[i];
  }
  round_to(w.scalar_type(), y, rows * out);
}

/* RMSNorm as the model computes it: x / rms(x) rounded to the dtype, times the weight, rounded. */
static void rms_norm(at::ScalarType dt, const float *x, const float *weight, float eps, float *y,
                     int64_t n) {
  double ss = 0;
  for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
  const float inv = 1.0f / std::sqrt((float)(ss / n) + eps);
  for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv;
  round_to(dt, y, n);
  for (int64_t i = 0; i < n; i++) y[i] *= weight[i];
  round_to(dt, y, n);
}

/* x (heads of D) rotated by the position's cos/sin (the model's rotate_half convention). */
static void rotate(at::ScalarType dt, float *x, int64_t heads, int64_t D, const float *cos,
                   const float *sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; h++) {
    float *v = x + h * D;
    for (int64_t d = 0; d < half; d++) {
      const float a = v[d], b = v[d + half];
      v[d] = a * cos[d] - b * sin[d];
      v[d + half] = b * cos[d + half] + a * sin[d + half];
    }
  }
  round_to(dt, x, heads * D);
}

/* The FFN's activation of the gate times the up projection, rounded as the model rounds. */
static void gated(at::ScalarType dt, int act, float *g, const float *u, int64_t n) {
  int64_t i = 0;
  if (act == SILU) {
    for (; i + LANES <= n; i += LANES) {
      const vec x = LOAD_X(g + i);
      STORE(g + i, DIV(x, ADD(BCAST(1.0f), vexp(SUB(ZERO(), x)))));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + std::exp(-g[i]));
  } else if (act == GELU_TANH) {
    const float c = 0.7978845608028654f;  /* sqrt(2 / pi) */
    for (; i + LANES <= n; i += LANES) {  /* x/2 (1 + tanh z) = x (1 - 1 / (1 + e^2z)) */
      const vec x = LOAD_X(g + i);
      const vec z = MUL(BCAST(c), FMA(MUL(BCAST(0.044715f), x), MUL(x, x), x));
      const vec e = vexp(ADD(z, z));
      STORE(g + i, SUB(x, DIV(x, ADD(BCAST(1.0f), e))));
    }
    for (; i < n; i++) {
      const float x = g[i];
      g[i] = 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
  } else if (act == GELU) {
    for (; i < n; i++) g[i] = 0.5f * g[i] * (1.0f + std::erf(g[i] * 0.7071067811865476f));
  } else {
    for (; i < n; i++) g[i] = std::max(g[i], 0.0f);
  }
  round_to(dt, g, n);
  for (int64_t j = 0; j < n; j++) g[j] *= u[j];
  round_to(dt, g, n);
}

/* One query row per head over the cache columns [lo, hi] (every other column hidden): softmax
 * in float32, output rounded to the dtype. q (H, D) float32; cache (1, KVH, L, D). */
template <typename T, vec (*LOAD)(const T *), float (*ONE)(T)>
static void attend_one(const float *q, const at::Tensor &ck, const at::Tensor &cv, int64_t H,
                       int64_t group, int64_t D, int64_t lo, int64_t hi, float scale, float *out,
                       std::vector<float> &p) {
  const T *kp = static_cast<const T *>(ck.const_data_ptr());
  const T *vp = static_cast<const T *>(cv.const_data_ptr());
  const int64_t body = D - D % LANES;
  p.resize(hi - lo + 1);
  for (int64_t h = 0; h < H; h++) {
    const T *kb = kp + (h / group) * ck.stride(1), *vb = vp + (h / group) * cv.stride(1);
    const float *qh = q + h * D;
    float top = -INFINITY;
    for (int64_t l = lo; l <= hi; l++) {
      const T *kr = kb + l * ck.stride(2);
      vec a = ZERO();
      for (int64_t d = 0; d < body; d += LANES) a = FMA(LOAD(kr + d), LOAD_X(qh + d), a);
      float s = SUM(a);
      for (int64_t d = body; d < D; d++) s += ONE(kr[d]) * qh[d];
      p[l - lo] = s * scale;
      top = std::max(top, p[l - lo]);
    }
    float total = 0, *o = out + h * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t l = lo; l <= hi; l++) {
      const float e = std::exp(p[l - lo] - top);
      total += e;
      const T *vr = vb + l * cv.stride(2);
      const vec ev = BCAST(e);
      for (int64_t d = 0; d < body; d += LANES) STORE(o + d, FMA(ev, LOAD(vr + d), LOAD_X(o + d)));
      for (int64_t d = body; d < D; d++) o[d] += e * ONE(vr[d]);
    }
    for (int64_t d = 0; d < D; d++) o[d] /= total;
  }
}

/* The forward of `tokens` (1 to MAX_ROWS) in columns col.. at the setting `layers` describes:
 * writes their keys and values into the cache and their logits, rounded to the dtype, to
 * `logits` (R rows of the vocabulary). */
static void forward(const std::vector<at::Tensor> &layers, const std::vector<at::Tensor> &globals,
                    const std::vector<int64_t> &layer_ints, const std::vector<int64_t> &ints,
                    double eps_d, const std::vector<int64_t> &tokens, int64_t col, int64_t pad,
                    float *logits) {
  TORCH_CHECK(globals.size() == GLOBALS && ints.size() == 3 && layers.size() % SLOTS == 0,
              "decode_step: the tensors as decode_step.py lists them");
  const int64_t n_layers = layers.size() / SLOTS, D = ints[0], group = ints[1];
  const int64_t R = tokens.size();
  const int act = (int)ints[2];
  TORCH_CHECK(layer_ints.size() == (size_t)(2 * n_layers), "decode_step: 2 ints per layer");
  TORCH_CHECK(R >= 1 && R <= MAX_ROWS, "decode_step: 1 to ", MAX_ROWS, " tokens");
  const at::Tensor &embed = globals[EMBED];
  const at::ScalarType dt = embed.scalar_type();
  const int64_t Hd = embed.size(1);
  TORCH_CHECK(col >= 0 && col + R <= layers[CACHE_K].size(2), "decode_step: columns past the cache");
  TORCH_CHECK(globals[COS].size(0) >= col + R, "decode_step: positions past the rotary table");
  for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < embed.size(0), "decode_step: token id out of range");
  const float eps = (float)eps_d, scale = 1.0f / std::sqrt((float)D);

  int64_t widest = Hd;
  for (int64_t i = 0; i < n_layers; i++) {
    const at::Tensor *l = &layers[i * SLOTS];
    widest = std::max({widest, l[WQ].size(0), l[GATE].size(0)});
  }
  /* row t of a buffer at t * (its width); the widths change per layer with the setting */
  thread_local Buffer x, xn, q, k, v, y, g, u;
  thread_local std::vector<float> p;
  x.resize(R * Hd), xn.resize(R * Hd), q.resize(R * widest), k.resize(R * widest);
  v.resize(R * widest), y.resize(R * widest), g.resize(R * widest), u.resize(R * widest);
  for (int64_t t = 0; t < R; t++)
    for (int64_t i = 0; i < Hd; i++)
      x[t * Hd + i] = load_one(dt, embed.const_data_ptr(), tokens[t] * Hd + i);

  for (int64_t li = 0; li < n_layers; li++) {
    const at::Tensor *l = &layers[li * SLOTS];
    const int64_t window = layer_ints[2 * li], kvh = layer_ints[2 * li + 1], H = kvh * group;
    const int64_t nq = H * D, nkv = kvh * D, m = l[GATE].size(0);
    for (int64_t t = 0; t < R; t++)
      rms_norm(dt, &x[t * Hd], l[IN_NORM].const_data_ptr<float>(), eps, &xn[t * Hd], Hd);
    product(l[WQ], l[BQ], xn.data(), q.data(), R);
    product(l[WK], l[BK], xn.data(), k.data(), R);
    product(l[WV], l[BV], xn.data(), v.data(), R);
    if (l[Q_NORM].numel()) {
      for (int64_t h = 0; h < R * H; h++)
        rms_norm(dt, &q[h * D], l[Q_NORM].const_data_ptr<float>(), eps, &q[h * D], D);
      for (int64_t h = 0; h < R * kvh; h++)
        rms_norm(dt, &k[h * D], l[K_NORM].const_data_ptr<float>(), eps, &k[h * D], D);
    }
    const at::Tensor &ck = l[CACHE_K], &cv = l[CACHE_V];
    for (int64_t t = 0; t < R; t++) {
      const int64_t c = col + t, pos = std::max<int64_t>(c - pad, 0);
      const float *cos = globals[COS].const_data_ptr<float>() + pos * D;
      const float *sin = globals[SIN].const_data_ptr<float>() + pos * D;
      rotate(dt, &q[t * nq], H, D, cos, sin);
      rotate(dt, &k[t * nkv], kvh, D, cos, sin);
      for (int64_t h = 0; h < kvh; h++)
        for (int64_t d = 0; d < D; d++) {
          store_one(dt, ck.mutable_data_ptr(), h * ck.stride(1) + c * ck.stride(2) + d, k[t * nkv + h * D + d]);
          store_one(dt, cv.mutable_data_ptr(), h * cv.stride(1) + c * cv.stride(2) + d, v[t * nkv + h * D + d]);
        }
    }
    for (int64_t t = 0; t < R; t++) {
      /* the columns token t sees: its row's first (padding hidden) to itself, or its window */
      const int64_t c = col + t;
      const int64_t lo = std::min(c, std::max(pad, window > 0 ? c - window + 1 : int64_t(0)));
      switch (dt) {
        case at::kHalf:
          attend_one<uint16_t, load_f16, f32_of_f16>(&q[t * nq], ck, cv, H, group, D, lo, c, scale, &y[t * nq], p);
          break;
        case at::kBFloat16:
          attend_one<uint16_t, load_bf16, f32_of_bf16>(&q[t * nq], ck, cv, H, group, D, lo, c, scale, &y[t * nq], p);
          break;
        default:
          attend_one<float, load_f32, f32_of_f32>(&q[t * nq], ck, cv, H, group, D, lo, c, scale, &y[t * nq], p);
      }
    }
    round_to(dt, y.data(), R * nq);
    product(l[WO], l[BO], y.data(), xn.data(), R);
    for (int64_t i = 0; i < R * Hd; i++) x[i] += xn[i];
    round_to(dt, x.data(), R * Hd);
    for (int64_t t = 0; t < R; t++)
      rms_norm(dt, &x[t * Hd], l[POST_NORM].const_data_ptr<float>(), eps, &xn[t * Hd], Hd);
    product(l[GATE], at::Tensor(), xn.data(), g.data(), R);
    product(l[UP], at::Tensor(), xn.data(), u.data(), R);
    gated(dt, act, g.data(), u.data(), R * m);
    product(l[DOWN], at::Tensor(), g.data(), xn.data(), R);
    for (int64_t i = 0; i < R * Hd; i++) x[i] += xn[i];
    round_to(dt, x.data(), R * Hd);
  }
  for (int64_t t = 0; t < R; t++)
    rms_norm(dt, &x[t * Hd], globals[FINAL_NORM].const_data_ptr<float>(), eps, &xn[t * Hd], Hd);
  product(globals[LM_HEAD], at::Tensor(), xn.data(), logits, R);
}

static at::Tensor decode_step(const std::vector<at::Tensor> &layers,
                              const std::vector<at::Tensor> &globals,
                              const std::vector<int64_t> &layer_ints,
                              const std::vector<int64_t> &ints, double eps,
                              const std::vector<int64_t> &tokens, int64_t col, int64_t pad) {
  TORCH_CHECK(globals.size() == GLOBALS, "decode_step: the tensors as decode_step.py lists them");
  const at::Tensor &embed = globals[EMBED];
  at::Tensor logits = at::empty({1, (int64_t)tokens.size(), globals[LM_HEAD].size(0)},
                                embed.options().dtype(at::kFloat));
  forward(layers, globals, layer_ints, ints, eps, tokens, col, pad, logits.mutable_data_ptr<float>());
  return embed.scalar_type() == at::kFloat ? logits : logits.to(embed.scalar_type());
}

/* torch.argmax's choice: the first largest value, a NaN counting as the largest. */
static int64_t argmax(const float *v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; i++) {
    if (std::isnan(v[i])) return i;
    if (v[i] > v[best]) best = i;
  }
  return best;
}

/* One greedy round of speculative decoding inside one model: k steps at the draft's setting
 * (`draft_layers`, the same cache) from `token` in column col, each drafting the argmax of its
 * logits, then the verify of token and the k drafts at the target's setting (`layers`), which
 * writes the target's entries over the draft's in columns col..col+k. Returns (2k + 1,): the k
 * drafts, then the target's argmax after each of the k + 1 tokens. The caller keeps the
 * columns of the accepted prefix (decode_step.py's `greedy_round`). Why one call: the Python
 * between a round's steps (a setting switch, plan lookups, argmax and tensor bookkeeping) was
 * 8-9% of a round of the 41.7M float32 model with a tier-3 draft, k = 2. */
static at::Tensor decode_round(const std::vector<at::Tensor> &layers,
                               const std::vector<at::Tensor> &draft_layers,
                               const std::vector<at::Tensor> &globals,
                               const std::vector<int64_t> &layer_ints,
                               const std::vector<int64_t> &draft_layer_ints,
                               const std::vector<int64_t> &ints, double eps, int64_t token,
                               int64_t k, int64_t col, int64_t pad) {
  TORCH_CHECK(globals.size() == GLOBALS, "decode_round: the tensors as decode_step.py lists them");
  TORCH_CHECK(k >= 1 && k < MAX_ROWS, "decode_round: 1 to ", MAX_ROWS - 1, " drafted tokens");
  const int64_t V = globals[LM_HEAD].size(0);
  thread_local Buffer logits;
  logits.resize(MAX_ROWS * V);
  at::Tensor out = at::empty({2 * k + 1}, at::dtype(at::kLong));
  int64_t *o = out.mutable_data_ptr<int64_t>();
  std::vector<int64_t> block{token};
  for (int64_t i = 0; i < k; i++) {
    forward(draft_layers, globals, draft_layer_ints, ints, eps, {block.back()}, col + i, pad,
            logits.data());
    block.push_back(o[i] = argmax(logits.data(), V));
  }
  forward(layers, globals, layer_ints, ints, eps, block, col, pad, logits.data());
  for (int64_t t = 0; t <= k; t++) o[k + t] = argmax(&logits[t * V], V);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(matformer, CPU, m) {
  m.impl("decode_step", &decode_step);
  m.impl("decode_round", &decode_round);
}

/* The C++ kernels of the compiled CPU decoding step (see row_kernel.py, which defines the two
 * operators' schemas and shape functions; this file registers their CPU implementations):
 *
 * matformer::row_matmul: y[n] = sum_k w[n * ldw + k] * x[k]. w is float32, float16 or bfloat16
 * (rows of K contiguous elements, ldw apart, so a tier's column slice is read in place), x and y
 * are float32 and every sum is float32. Each weight row is read once, converted in registers and
 * multiplied into independent accumulators: a memory-bound loop at the DRAM's rate.
 *
 * matformer::decode_attention: attention of a few query rows over a KV cache (below).
 *
 * Built with -march=native: AVX-512 (F, BW, VL) or AVX2 with F16C and FMA; on any other CPU the
 * file does not compile and matformer keeps inductor's reductions and PyTorch's attention. */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

#define LANES 16
typedef __m512 vec;
#define ZERO() _mm512_setzero_ps()
#define FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define ADD(a, b) _mm512_add_ps((a), (b))
#define SUM(a) _mm512_reduce_add_ps(a)
#define LOAD_X(p) _mm512_loadu_ps(p)
#define STORE(p, a) _mm512_storeu_ps((p), (a))
#define BCAST(v) _mm512_set1_ps(v)
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define LOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_BF16(p) \
  _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))

#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)

#define LANES 8
typedef __m256 vec;
#define ZERO() _mm256_setzero_ps()
#define FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define ADD(a, b) _mm256_add_ps((a), (b))
static inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#define SUM(a) sum8(a)
#define LOAD_X(p) _mm256_loadu_ps(p)
#define STORE(p, a) _mm256_storeu_ps((p), (a))
#define BCAST(v) _mm256_set1_ps(v)
#define LOAD_F32(p) _mm256_loadu_ps(p)
#define LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_BF16(p) \
  _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))

#else
#error "row_kernel.cpp needs AVX-512 (F, BW, VL) or AVX2 with F16C and FMA"
#endif

static inline float f32_of_f32(float v) { return v; }
static inline float f32_of_f16(uint16_t v) { return _cvtsh_ss(v); }
static inline float f32_of_bf16(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

/* The first 4 KB after a weight, asked for while its last 8 rows are read: in a decoding step
 * the next product's weight usually lies right there (the model's weights sit in order on one
 * huge-page mapping, inference/huge_pages.py), and its first reads otherwise wait for the
 * memory while the hardware prefetcher picks the new stream up. Prefetches never fault, so
 * reading past the end of the tensor is safe. The 41.7M float16 step, 16 alternated pairs of
 * runs on the noisy development machine: faster in 11, medians per round 0.90x, 1.04x, 0.97x of
 * without (16 KB ahead: slower). A small gain, kept because it costs nothing. */
constexpr int64_t AHEAD_ROWS = 8, AHEAD_BYTES = 512;

static inline void next_weight(const void *after, int64_t rows_left) {
  const char *p = static_cast<const char *>(after) + (AHEAD_ROWS - rows_left) * AHEAD_BYTES;
  for (int64_t b = 0; b < AHEAD_BYTES; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

/* Four accumulators of LANES each: independent FMA chains hide the FMA latency, and a weight
 * row of a few hundred elements still fills them. */
#define ROWS(NAME, T, LOAD, SCALAR)                                                           \
  static void NAME(const T *w, int64_t ldw, const float *x, float *y, int64_t n_rows, int64_t k) { \
    const int64_t step = 4 * LANES, body = k - k % step;                                     \
    for (int64_t n = 0; n < n_rows; n++) {                                                    \
      const T *r = w + n * ldw, *end = r + body;                                              \
      if (n_rows - n <= AHEAD_ROWS) next_weight(w + (n_rows - 1) * ldw + k, n_rows - n);       \
      const float *q = x;                                                                     \
      vec a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO();                                 \
      /* pointers stepped, not indexed: indexed loads ran 25% slower on the AMD development CPU */ \
      for (; r < end; r += step, q += step) {                                                 \
        a0 = FMA(LOAD(r), LOAD_X(q), a0);                                                     \
        a1 = FMA(LOAD(r + LANES), LOAD_X(q + LANES), a1);                                     \
        a2 = FMA(LOAD(r + 2 * LANES), LOAD_X(q + 2 * LANES), a2);                             \
        a3 = FMA(LOAD(r + 3 * LANES), LOAD_X(q + 3 * LANES), a3);                             \
      }                                                                                       \
      float s = SUM(ADD(ADD(a0, a1), ADD(a2, a3)));                                           \
      for (int64_t i = body; i < k; i++) s += SCALAR(r[i - body]) * x[i];                     \
      y[n] = s;                                                                               \
    }                                                                                         \
  }

ROWS(rows_f32, float, LOAD_F32, f32_of_f32)
ROWS(rows_f16, uint16_t, LOAD_F16, f32_of_f16)
ROWS(rows_bf16, uint16_t, LOAD_BF16, f32_of_bf16)

static inline vec load_f32(const float *p) { return LOAD_F32(p); }
static inline vec load_f16(const uint16_t *p) { return LOAD_F16(p); }
static inline vec load_bf16(const uint16_t *p) { return LOAD_BF16(p); }

/* Attention of a few query rows per (batch row, head) over a cache, for a decoding step or a
 * verify: q (B, H, T, D), k and v (B, KVH, L, D) (head h reads KV head h / (H / KVH)), all of
 * one dtype with unit stride along D; mask: booleans broadcast as (B or 1, 1, T or 1, L), true
 * where a column is seen; out (B, H, T, D) float32. Scores, softmax and sums are float32, and
 * the columns a mask hides are skipped. It replaces PyTorch's CPU flash attention, whose fixed
 * cost (about 50 us a call: blocks, buffers, a parallel loop) is most of a small model's
 * attention at a few query rows. */
template <typename T, vec (*LOAD)(const T *), float (*ONE)(T)>
static void attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                   const bool *mask, int64_t mask_b, int64_t mask_t, int64_t mask_l,
                   double scale, at::Tensor &out) {
  const int64_t B = q.size(0), H = q.size(1), TQ = q.size(2), D = q.size(3);
  const int64_t KVH = k.size(1), L = k.size(2), G = H / KVH, body = D - D % LANES;
  const T *qp = static_cast<const T *>(q.const_data_ptr());
  const T *kp = static_cast<const T *>(k.const_data_ptr());
  const T *vp = static_cast<const T *>(v.const_data_ptr());
  float *op = out.mutable_data_ptr<float>();
  std::vector<float> qf(D), acc(D), p(L);
  for (int64_t b = 0; b < B; b++) {
    for (int64_t h = 0; h < H; h++) {
      const T *kb = kp + b * k.stride(0) + (h / G) * k.stride(1);
      const T *vb = vp + b * v.stride(0) + (h / G) * v.stride(1);
      for (int64_t t = 0; t < TQ; t++) {
        const bool *m = mask ? mask + b * mask_b + t * mask_t : nullptr;
        const T *qr = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
        for (int64_t d = 0; d < D; d++) qf[d] = ONE(qr[d]);
        float top = -INFINITY;
        for (int64_t l = 0; l < L; l++) {
          if (m && !m[l * mask_l]) {
            p[l] = -INFINITY;
            continue;
          }
          const T *kr = kb + l * k.stride(2);
          vec a = ZERO();
          for (int64_t d = 0; d < body; d += LANES) a = FMA(LOAD(kr + d), LOAD_X(qf.data() + d), a);
          float s = SUM(a);
          for (int64_t d = body; d < D; d++) s += ONE(kr[d]) * qf[d];
          p[l] = s * (float)scale;
          top = std::max(top, p[l]);
        }
        float total = 0;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t l = 0; l < L; l++) {
          if (p[l] == -INFINITY) continue;
          const float e = std::exp(p[l] - top);
          total += e;
          const T *vr = vb + l * v.stride(2);
          const vec ev = BCAST(e);
          for (int64_t d = 0; d < body; d += LANES)
            STORE(acc.data() + d, FMA(ev, LOAD(vr + d), LOAD_X(acc.data() + d)));
          for (int64_t d = body; d < D; d++) acc[d] += e * ONE(vr[d]);
        }
        float *o = op + ((b * H + h) * TQ + t) * D;
        for (int64_t d = 0; d < D; d++) o[d] = total > 0 ? acc[d] / total : NAN;  /* all hidden: NaN, as softmax */
      }
    }
  }
}

static at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                   const c10::optional<at::Tensor> &mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "decode_attention: q (B, H, T, D), k and v (B, KVH, L, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v of one dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                  q.size(1) % k.size(1) == 0,
              "decode_attention: shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: unit stride along the head dimension");
  const bool *mp = nullptr;
  int64_t mask_b = 0, mask_t = 0, mask_l = 0;
  at::Tensor mc;
  if (mask.has_value()) {
    mc = *mask;
    TORCH_CHECK(mc.scalar_type() == at::kBool && mc.dim() == 4 && mc.size(1) == 1 &&
                    (mc.size(2) == 1 || mc.size(2) == q.size(2)) && mc.size(3) == k.size(2) &&
                    (mc.size(0) == 1 || mc.size(0) == q.size(0)),
                "decode_attention: mask must be booleans (B or 1, 1, T or 1, L)");
    mp = mc.const_data_ptr<bool>();
    mask_b = mc.size(0) == 1 ? 0 : mc.stride(0);
    mask_t = mc.size(2) == 1 ? 0 : mc.stride(2);
    mask_l = mc.stride(3);
  }
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  switch (q.scalar_type()) {
    case at::kFloat:
      attend<float, load_f32, f32_of_f32>(q, k, v, mp, mask_b, mask_t, mask_l, scale, out);
      break;
    case at::kHalf:
      attend<uint16_t, load_f16, f32_of_f16>(q, k, v, mp, mask_b, mask_t, mask_l, scale, out);
      break;
    case at::kBFloat16:
      attend<uint16_t, load_bf16, f32_of_bf16>(q, k, v, mp, mask_b, mask_t, mask_l, scale, out);
      break;
    default: TORCH_CHECK(false, "decode_attention: float32, float16 or bfloat16");
  }
  return out;
}

/* y (1, out) float32 = x (1, in) float32 times weight (out, in) with unit stride along in. */
static at::Tensor row_matmul(const at::Tensor &x, const at::Tensor &weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "row_matmul: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == 1,
              "row_matmul: x must be one float32 row (1, in)");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1 && weight.size(1) == x.size(1),
              "row_matmul: weight must be (out, in) with unit stride along in");
  const at::Tensor xc = x.contiguous();
  const int64_t out = weight.size(0), k = weight.size(1), ldw = weight.stride(0);
  at::Tensor y = at::empty({1, out}, x.options());
  const float *xp = xc.const_data_ptr<float>();
  float *yp = y.mutable_data_ptr<float>();
  const void *wp = weight.const_data_ptr();
  switch (weight.scalar_type()) {
    case at::kFloat: rows_f32(static_cast<const float *>(wp), ldw, xp, yp, out, k); break;
    case at::kHalf: rows_f16(static_cast<const uint16_t *>(wp), ldw, xp, yp, out, k); break;
    case at::kBFloat16: rows_bf16(static_cast<const uint16_t *>(wp), ldw, xp, yp, out, k); break;
    default: TORCH_CHECK(false, "row_matmul: weight must be float32, float16 or bfloat16");
  }
  return y;
}

TORCH_LIBRARY_IMPL(matformer, CPU, m) {
  m.impl("row_matmul", &row_matmul);
  m.impl("decode_attention", &decode_attention);
}

/* What the CPU kernels share (row_kernel.cpp, decode_step.cpp): the instruction set's vector
 * operations, conversions of float16/bfloat16 to float32 and back, and the one-row products.
 * Built with -march=native: AVX-512 (F, BW, VL) or AVX2 with F16C and FMA; on any other CPU the
 * kernels do not compile and matformer keeps inductor's reductions and PyTorch's attention. */
#pragma once
#include <immintrin.h>
#include <stdint.h>

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
#define MUL(a, b) _mm512_mul_ps((a), (b))
#define SUB(a, b) _mm512_sub_ps((a), (b))
#define DIV(a, b) _mm512_div_ps((a), (b))
#define MAXV(a, b) _mm512_max_ps((a), (b))
#define MINV(a, b) _mm512_min_ps((a), (b))
#define ROUNDV(a) _mm512_roundscale_ps((a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define EXP2I(p, n) _mm512_scalef_ps((p), (n)) /* p * 2^n, n a whole number */
#define VIA_F16(a) _mm512_cvtph_ps(_mm512_cvtps_ph((a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))

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
#define MUL(a, b) _mm256_mul_ps((a), (b))
#define SUB(a, b) _mm256_sub_ps((a), (b))
#define DIV(a, b) _mm256_div_ps((a), (b))
#define MAXV(a, b) _mm256_max_ps((a), (b))
#define MINV(a, b) _mm256_min_ps((a), (b))
#define ROUNDV(a) _mm256_round_ps((a), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline __m256 exp2i(__m256 p, __m256 n) { /* p * 2^n, n a whole number in [-126, 127] */
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#define EXP2I(p, n) exp2i((p), (n))
#define VIA_F16(a) _mm256_cvtph_ps(_mm256_cvtps_ph((a), _MM_FROUND_TO_NEAREST_INT))

#else
#error "the CPU kernels need AVX-512 (F, BW, VL) or AVX2 with F16C and FMA"
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

/* e^x in float32 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for
 * e^r, times 2^n), within 2 ulp; inputs clamped to [-87, 88], where e^x is a normal float. */
static inline vec vexp(vec x) {
  x = MINV(MAXV(x, BCAST(-87.0f)), BCAST(88.0f));
  const vec n = ROUNDV(MUL(x, BCAST(1.44269504088896341f)));
  vec r = FMA(n, BCAST(-0.693359375f), x);
  r = FMA(n, BCAST(2.12194440e-4f), r);
  vec p = BCAST(1.9875691500e-4f);
  p = FMA(p, r, BCAST(1.3981999507e-3f));
  p = FMA(p, r, BCAST(8.3334519073e-3f));
  p = FMA(p, r, BCAST(4.1665795894e-2f));
  p = FMA(p, r, BCAST(1.6666665459e-1f));
  p = FMA(p, r, BCAST(5.0000001201e-1f));
  p = FMA(MUL(p, r), r, ADD(r, BCAST(1.0f)));
  return EXP2I(p, n);
}

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
 * The vector operations and the one-row products themselves are in cpu_simd.h. */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_simd.h"

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

// The small operations of a decode step, one call each (gym_core/sampling/fused.py).
//
// At batch 32 a decode step of SmolLM2-135M spends about half its time outside the
// matmuls when each small operation is a separate torch call: RMSNorm is seven ops,
// rotary embedding four, attention over the cache goes through a kernel built for long
// queries. Here each is one pass over the rows, vectorised with ATen's own Vectorized
// (Sleef's exp), on torch's thread pool for the few that are worth splitting.
//
//   rms_norm(x, delta?, w, eps)   x += delta (in place, when given); returns w * x / rms(x)
//   attend(qkv, prompt_keys, prompt_values, prompt_bias, group, keys, values, slots,
//          positions, cos, sin, heads, scale, q_norm?, k_norm?, norm_eps)
//                                 per-head RMSNorm of q and k (when q_norm / k_norm are
//                                 given: Qwen3), then rotary at each row's position
//                                 (cos / sin are tables [T, d], positions [n]); k and v
//                                 written into the row's own cache at its slot (slots [n]:
//                                 rows may be at different lengths, as a server's are);
//                                 grouped-query attention of the one new query over its
//                                 prompt's cache (shared by the rows of a prompt: group[row]
//                                 names it; prompt_bias is -inf on its padding, 0 elsewhere;
//                                 P = 0 when rows hold their prompt in their own cache) and
//                                 its own positions 0..slot; returns [n, heads * d].
//                                 Keys are stored transposed ([.., d, T]): a query's
//                                 scores are then d vector updates, no horizontal sums
//   silu_mul(gate_up)             silu(gate) * up, gate_up = [gate | up] along the last dim
//   draw(logits, u, temperature)  per row a token of softmax(logits / temperature) by inverse
//                                 CDF (the first whose cumulative mass, in float64, exceeds
//                                 u x the total) and its log-prob: one pass, no probability
//                                 tensor

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

at::Tensor rms_norm(at::Tensor x, const std::optional<at::Tensor>& delta, const at::Tensor& w,
                    double eps) {
  check_float(x, "x", 2);
  check_float(w, "weight", 1);
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(w.size(0) == d, "weight must be [", d, "]");
  float* xp = x.data_ptr<float>();
  const float* dp = nullptr;
  if (delta.has_value()) {
    check_float(*delta, "delta", 2);
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must be shaped like x");
    dp = delta->data_ptr<float>();
  }
  at::Tensor y = at::empty_like(x);
  float* yp = y.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    float* xr = xp + r * d;
    float* yr = yp + r * d;
    if (dp != nullptr) {
      const float* dr = dp + r * d;
      at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, xr, xr, dr, d);
    }
    const float ms = dot(xr, xr, d) / float(d);
    const float inv = 1.f / std::sqrt(ms + float(eps));
    at::vec::map2<float>([inv](Vec a, Vec g) { return g * (a * Vec(inv)); }, yr, xr, wp, d);
  }
  return y;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  check_float(gu, "gate_up", 2);
  const int64_t n = gu.size(0), inter = gu.size(1) / 2;
  TORCH_CHECK(gu.size(1) == 2 * inter, "gate_up must have an even last dimension");
  at::Tensor out = at::empty({n, inter}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(inter, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gate = g + r * 2 * inter;
      at::vec::map2<float>(
          [](Vec a, Vec b) { return a / (Vec(1.f) + a.neg().exp()) * b; },
          o + r * inter, gate, gate + inter, inter);
    }
  });
  return out;
}

// out[i] = x[i] * cos[i] + x[(i + d/2) % d] * sin[i]  (sin carries rotate_half's sign)
void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// out = w * x / rms(x) over one head (Qwen3's q_norm / k_norm)
void head_norm(const float* x, const float* w, float eps, float* out, int64_t d) {
  const float inv = 1.f / std::sqrt(dot(x, x, d) / float(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * inv);
}

int64_t round_up(int64_t x) { return (x + Vec::size() - 1) / Vec::size() * Vec::size(); }

// The R query heads that share a key/value head, together: each key or value vector is
// loaded once for all R, and R independent sums hide the FMA latency.

// s[r * ld + t] = sum_i q[r * d + i] * kt[i * stride + t] for t < len rounded up to a whole
// vector (keys stored transposed; the buffers are padded so that the last vector is valid)
template <int R>
void scores_of(const float* q, const float* kt, int64_t stride, int64_t d, int64_t len,
               float* s, int64_t ld) {
  for (int64_t t = 0; t < len; t += Vec::size()) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vec(0.f);
    for (int64_t i = 0; i < d; ++i) {
      const Vec k = Vec::loadu(kt + i * stride + t);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec(q[r * d + i]), k, acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r].store(s + r * ld + t);
  }
}

// o[r * d + i] += sum_t p[r * ld + t] * v[t * d + i]
template <int R>
void mix(const float* p, int64_t ld, const float* v, int64_t len, int64_t d, float* o) {
  for (int64_t i = 0; i + Vec::size() <= d; i += Vec::size()) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vec::loadu(o + r * d + i);
    for (int64_t t = 0; t < len; ++t) {
      const Vec x = Vec::loadu(v + t * d + i);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec(p[r * ld + t]), x, acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r].store(o + r * d + i);
  }
  for (int64_t i = d / Vec::size() * Vec::size(); i < d; ++i)
    for (int r = 0; r < R; ++r)
      for (int64_t t = 0; t < len; ++t) o[r * d + i] += p[r * ld + t] * v[t * d + i];
}

// attention of R query heads (rotated, q[r * d + i]) over a prompt's cache and a row's own
template <int R>
void attend_heads(const float* q, const float* ptk, const float* ptv, const float* bias, int64_t plen,
                  int64_t pstride, const float* ctk, const float* ctv, int64_t clen, int64_t cstride,
                  int64_t d, float scale, float* s, int64_t ld, float* o) {
  scores_of<R>(q, ptk, pstride, d, plen, s, ld);
  scores_of<R>(q, ctk, cstride, d, clen, s + plen, ld);
  const int64_t len = plen + clen;
  float inv[R];
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * ld;
    at::vec::map2<float>([scale](Vec x, Vec b) { return x * Vec(scale) + b; }, sr, sr, bias, plen);
    at::vec::map<float>([scale](Vec x) { return x * Vec(scale); }, sr + plen, sr + plen, clen);
    const float mx = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                                sr, len);
    at::vec::map<float>([mx](Vec x) { return (x - Vec(mx)).exp(); }, sr, sr, len);
    inv[r] = 1.f / at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sr, len);
  }
  std::fill(o, o + R * d, 0.f);
  mix<R>(s, ld, ptv, plen, d, o);
  mix<R>(s + plen, ld, ctv, clen, d, o);
  for (int r = 0; r < R; ++r)
    at::vec::map<float>([x = inv[r]](Vec a) { return a * Vec(x); }, o + r * d, o + r * d, d);
}

at::Tensor attend(const at::Tensor& qkv, const at::Tensor& prompt_keys, const at::Tensor& prompt_values,
                  const at::Tensor& prompt_bias, const at::Tensor& group, at::Tensor keys,
                  at::Tensor values, const at::Tensor& slots, const at::Tensor& positions,
                  const at::Tensor& cos, const at::Tensor& sin, int64_t heads, double scale,
                  const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                  double norm_eps) {
  check_float(qkv, "qkv", 2);
  check_float(prompt_keys, "prompt_keys", 4);
  check_float(prompt_values, "prompt_values", 4);
  check_float(keys, "keys", 4);
  check_float(values, "values", 4);
  check_float(cos, "cos", 2);
  check_float(sin, "sin", 2);
  check_float(prompt_bias, "prompt_bias", 2);
  for (const at::Tensor* t : {&group, &slots, &positions})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1,
                "group, slots and positions must be int64 [n]");
  const int64_t np = prompt_keys.size(0), kv = prompt_keys.size(1), d = prompt_keys.size(2),
                pstride = prompt_keys.size(3), plen = prompt_bias.size(1);
  const int64_t n = keys.size(0), width = keys.size(3);
  TORCH_CHECK(prompt_values.size(0) == np && prompt_values.size(1) == kv && prompt_values.size(2) == plen &&
                  prompt_values.size(3) == d, "prompt_values must be [B, kv, P, d]");
  TORCH_CHECK(prompt_bias.size(0) == np, "prompt_bias must be [B, P]");
  TORCH_CHECK(pstride >= round_up(plen), "prompt_keys must be [B, kv, d, P] padded to whole vectors");
  TORCH_CHECK(keys.size(1) == kv && keys.size(2) == d && width == round_up(width),
              "keys must be [n, kv, d, T] with T a whole number of vectors");
  TORCH_CHECK(values.size(0) == n && values.size(1) == kv && values.size(2) == width && values.size(3) == d,
              "values must be [n, kv, T, d]");
  TORCH_CHECK(heads % kv == 0, "heads must be a multiple of the key/value heads");
  TORCH_CHECK(qkv.size(0) == n && qkv.size(1) == (heads + 2 * kv) * d, "qkv must be [n, (heads + 2 kv) d]");
  TORCH_CHECK(group.size(0) == n && slots.size(0) == n && positions.size(0) == n,
              "group, slots and positions must have one entry per row");
  TORCH_CHECK(cos.size(1) == d && sin.sizes() == cos.sizes(), "cos and sin must be [T, d]");
  const float* qn = nullptr;
  const float* kn = nullptr;
  if (q_norm.has_value() || k_norm.has_value()) {
    TORCH_CHECK(q_norm.has_value() && k_norm.has_value(), "q_norm and k_norm come together");
    check_float(*q_norm, "q_norm", 1);
    check_float(*k_norm, "k_norm", 1);
    TORCH_CHECK(q_norm->size(0) == d && k_norm->size(0) == d, "q_norm and k_norm must be [d]");
    qn = q_norm->data_ptr<float>();
    kn = k_norm->data_ptr<float>();
  }
  const int64_t* gp = group.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  const int64_t* psp = positions.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK(gp[b] >= 0 && gp[b] < np, "group index out of range");
    TORCH_CHECK(slp[b] >= 0 && slp[b] < width, "slot outside the cache");
    TORCH_CHECK(psp[b] >= 0 && psp[b] < cos.size(0), "position outside the rotary table");
    longest = std::max(longest, slp[b] + 1);
  }
  const int64_t rep = heads / kv, qw = (heads + 2 * kv) * d;
  const int64_t ld = plen + round_up(longest);  // one row of scores per query head
  at::Tensor out = at::empty({n, heads * d}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* pk = prompt_keys.data_ptr<float>();
  const float* pv = prompt_values.data_ptr<float>();
  const float* pm = prompt_bias.data_ptr<float>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale), eps = float(norm_eps);
  // units ordered (kv head, row): consecutive rows of one prompt reuse its keys in cache
  at::parallel_for(0, n * kv, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> q(rep * d), kr(d), normed(d), s(std::max<int64_t>(rep, 8) * ld + Vec::size());
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u / n, b = u % n, p = gp[b], slot = slp[b], clen = slot + 1;
      const float* c = cp + psp[b] * d;
      const float* si = sp + psp[b] * d;
      const float* row = src + b * qw;
      const float* ptk = pk + (p * kv + g) * d * pstride;
      const float* ptv = pv + (p * kv + g) * plen * d;
      float* ctk = kp + (b * kv + g) * d * width;
      float* ctv = vp + (b * kv + g) * width * d;
      const float* k = row + (heads + g) * d;
      if (kn != nullptr) {
        head_norm(k, kn, eps, normed.data(), d);
        k = normed.data();
      }
      rotate(k, c, si, kr.data(), d);
      for (int64_t i = 0; i < d; ++i) ctk[i * width + slot] = kr[i];
      std::copy(row + (heads + kv + g) * d, row + (heads + kv + g + 1) * d, ctv + slot * d);
      const float* m = pm + p * plen;
      for (int64_t r = 0; r < rep; ++r) {
        const float* x = row + (g * rep + r) * d;
        if (qn != nullptr) {
          head_norm(x, qn, eps, normed.data(), d);
          x = normed.data();
        }
        rotate(x, c, si, q.data() + r * d, d);
      }
      float* o = op + b * heads * d + g * rep * d;  // this group's heads are contiguous
      switch (rep) {
#define GYM_ATTEND_CASE(R)                                                                   \
  case R:                                                                                    \
    attend_heads<R>(q.data(), ptk, ptv, m, plen, pstride, ctk, ctv, clen, width, d, sc,      \
                    s.data(), ld, o);                                                        \
    break;
        GYM_ATTEND_CASE(1) GYM_ATTEND_CASE(2) GYM_ATTEND_CASE(3) GYM_ATTEND_CASE(4)
        GYM_ATTEND_CASE(5) GYM_ATTEND_CASE(6) GYM_ATTEND_CASE(7) GYM_ATTEND_CASE(8)
#undef GYM_ATTEND_CASE
        default:
          for (int64_t r = 0; r < rep; ++r)
            attend_heads<1>(q.data() + r * d, ptk, ptv, m, plen, pstride, ctk, ctv, clen, width,
                            d, sc, s.data(), ld, o + r * d);
      }
    }
  });
  return out;
}

// Per row: z = logits / temperature, e = exp(z - max z); the token is where the running
// sum of e, in float64 over blocks of 64 and then within the block, first exceeds
// u * sum(e); its log-prob is z - max z - log(sum(e)).
std::tuple<at::Tensor, at::Tensor> draw(const at::Tensor& logits, const at::Tensor& u,
                                        double temperature) {
  check_float(logits, "logits", 2);
  TORCH_CHECK(u.scalar_type() == at::kDouble && u.is_contiguous() && u.dim() == 1 &&
                  u.size(0) == logits.size(0), "u must be float64 [n]");
  TORCH_CHECK(temperature > 0, "temperature must be positive");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(v > 0, "logits must have at least one column");
  constexpr int64_t block = 64;
  const int64_t blocks = (v + block - 1) / block;
  at::Tensor tokens = at::empty({n}, logits.options().dtype(at::kLong));
  at::Tensor logps = at::empty({n}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* op = logps.data_ptr<float>();
  const float temp = float(temperature);
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> e(v);
    std::vector<double> sums(blocks);
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = lp + r * v;
      at::vec::map<float>([temp](Vec a) { return a / Vec(temp); }, e.data(), x, v);
      const float mx = at::vec::reduce_all<float>(
          [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, e.data(), v);
      at::vec::map<float>([mx](Vec a) { return (a - Vec(mx)).exp(); }, e.data(), e.data(), v);
      double total = 0.0;
      for (int64_t k = 0; k < blocks; ++k) {
        double b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0;
        const int64_t lo = k * block, hi = std::min(v, lo + block);
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) b0 += e[i], b1 += e[i + 1], b2 += e[i + 2], b3 += e[i + 3];
        for (; i < hi; ++i) b0 += e[i];
        sums[k] = (b0 + b1) + (b2 + b3);
        total += sums[k];
      }
      if (!std::isfinite(total) || total <= 0.0) {  // NaN or infinite logits: what argmax
        int64_t best = 0;                             // picks (a NaN first), so the step goes on
        for (int64_t i = 0; i < v; ++i) {             // and the loss reports the NaN
          if (std::isnan(x[i])) {
            best = i;
            break;
          }
          if (x[i] > x[best]) best = i;
        }
        tp[r] = best;
        op[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      const double target = up[r] * total;
      double acc = 0.0;
      int64_t k = 0;
      while (k < blocks - 1 && acc + sums[k] <= target) acc += sums[k++];
      const int64_t lo = k * block, hi = std::min(v, lo + block);
      int64_t pick = -1;
      for (int64_t i = lo; i < hi; ++i) {
        if (e[i] > 0.f) pick = i;  // at worst the block's last token with mass
        acc += e[i];
        if (acc > target && e[i] > 0.f) break;
      }
      if (pick < 0)  // the block has no mass (target rounded past the others): the last that has
        for (int64_t i = v - 1; i >= 0 && pick < 0; --i)
          if (e[i] > 0.f) pick = i;
      tp[r] = pick;
      op[r] = (e[pick] > 0.f ? x[pick] / temp - mx : -std::numeric_limits<float>::infinity()) -
              float(std::log(total));
    }
  });
  return {tokens, logps};
}

}  // namespace

TORCH_LIBRARY(gym_decode, m) {
  m.def("rms_norm(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("attend(Tensor qkv, Tensor prompt_keys, Tensor prompt_values, Tensor prompt_bias, Tensor group, "
        "Tensor(a!) keys, Tensor(b!) values, Tensor slots, Tensor positions, Tensor cos, Tensor sin, int heads, "
        "float scale, Tensor? q_norm, Tensor? k_norm, float norm_eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("draw(Tensor logits, Tensor u, float temperature) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gym_decode, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("attend", attend);
  m.impl("silu_mul", silu_mul);
  m.impl("draw", draw);
}

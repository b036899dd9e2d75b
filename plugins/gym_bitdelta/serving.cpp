// BitDelta's serving kernel: y[row] += alpha * S x[row] for many rows of many variants in
// one call, computed from the packed sign bits (docs/algorithms.md, "Serving deltas").
//
// Layout ("nibble lanes"): a sign matrix S [out, in] is stored as uint32 words
//   word[(ob * in_words + c) * 16 + l], bit 4 t + i  =  1 if S[16 ob + l, 32 c + 4 t + i] = +1
// with out padded to a multiple of 16 and in to a multiple of 32 (padding bits 0). That is
// exactly one bit per weight when the shape is a multiple of (16, 32), as every SmolLM2
// projection is. For each row x, each nibble n (inputs 4n..4n+3) gets a 16-entry table
//   T[n][b] = sum_i (bit i of b ? x[4n+i] : -x[4n+i])
// and y[j] = alpha * sum_n T[n][nibble n of row j's bits]. With AVX-512 one vpermps looks
// the 16 lanes of a block up in a table held in one register: 64 sign-MACs per
// shift + permute + add, against 16 per FMA for the dense fp32 product (T-MAC's idea, with
// fp32 tables so the result matches dequantize-then-matmul to fp32 rounding).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#if defined(__AVX512F__) && !defined(GYM_PORTABLE)
#include <immintrin.h>
#define GYM_AVX512 1
#endif

namespace {

constexpr int64_t LANES = 16;  // output rows per block
constexpr int64_t CHUNK = 32;  // input columns per word
constexpr int64_t NIB = CHUNK / 4;  // nibbles per word

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

std::unique_ptr<float[], AlignedFree> aligned_floats(int64_t n) {
  size_t bytes = ((size_t(n) * sizeof(float) + 63) / 64) * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
  TORCH_CHECK(p != nullptr, "out of memory allocating ", bytes, " bytes of tables");
  return std::unique_ptr<float[], AlignedFree>(p);
}

// The 16-entry tables of one row: t[16 n + b] for n < in_words * 8.
void build_tables(const float* x, int64_t in, int64_t in_words, float* t) {
  const int64_t nibbles = in_words * NIB;
#ifdef GYM_AVX512
  alignas(64) float sign[4][16];
  for (int i = 0; i < 4; ++i)
    for (int b = 0; b < 16; ++b) sign[i][b] = (b >> i & 1) ? 1.f : -1.f;
  const __m512 s0 = _mm512_load_ps(sign[0]), s1 = _mm512_load_ps(sign[1]);
  const __m512 s2 = _mm512_load_ps(sign[2]), s3 = _mm512_load_ps(sign[3]);
  const int64_t full = in / 4;
  for (int64_t n = 0; n < full; ++n) {
    const float* v = x + 4 * n;
    __m512 acc = _mm512_mul_ps(_mm512_set1_ps(v[0]), s0);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(v[1]), s1, acc);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(v[2]), s2, acc);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(v[3]), s3, acc);
    _mm512_store_ps(t + 16 * n, acc);
  }
  for (int64_t n = full; n < nibbles; ++n) {
#else
  for (int64_t n = 0; n < nibbles; ++n) {
#endif
    float v[4];
    for (int i = 0; i < 4; ++i) v[i] = 4 * n + i < in ? x[4 * n + i] : 0.f;
    for (int b = 0; b < 16; ++b) {
      float s = 0.f;
      for (int i = 0; i < 4; ++i) s += (b >> i & 1) ? v[i] : -v[i];
      t[16 * n + b] = s;
    }
  }
}

// acc[r][l] += sum over `words` words of tables[r] looked up by one block's bits, R rows.
template <int R>
void block_rows(const uint32_t* w, int64_t in_words, const float* const* tables, float* acc) {
#ifdef GYM_AVX512
  __m512 sum[R];
  for (int r = 0; r < R; ++r) sum[r] = _mm512_loadu_ps(acc + r * LANES);
  for (int64_t c = 0; c < in_words; ++c) {
    const __m512i word = _mm512_loadu_si512(w + c * LANES);
    __m512i idx[NIB];
    idx[0] = word;
    for (int t = 1; t < NIB; ++t) idx[t] = _mm512_srli_epi32(word, 4 * t);
    for (int r = 0; r < R; ++r) {
      const float* tc = tables[r] + c * NIB * 16;
      // a tree, so the loop-carried dependency is one add per word
      __m512 p[NIB];
      for (int t = 0; t < NIB; ++t) p[t] = _mm512_permutexvar_ps(idx[t], _mm512_load_ps(tc + 16 * t));
      __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])),
                               _mm512_add_ps(_mm512_add_ps(p[4], p[5]), _mm512_add_ps(p[6], p[7])));
      sum[r] = _mm512_add_ps(sum[r], s);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * LANES, sum[r]);
#else
  for (int64_t c = 0; c < in_words; ++c) {
    for (int64_t l = 0; l < LANES; ++l) {
      const uint32_t word = w[c * LANES + l];
      for (int r = 0; r < R; ++r) {
        const float* tc = tables[r] + c * NIB * 16;
        float s = 0.f;
        for (int t = 0; t < NIB; ++t) s += tc[16 * t + ((word >> (4 * t)) & 15u)];
        acc[r * LANES + l] += s;
      }
    }
  }
#endif
}

void check_words(const at::Tensor& words, int64_t out, int64_t in) {
  TORCH_CHECK(words.scalar_type() == at::kInt && words.is_contiguous() && words.dim() == 1,
              "BitDelta serving words must be a contiguous int32 vector");
  const int64_t need = (out + LANES - 1) / LANES * ((in + CHUNK - 1) / CHUNK) * LANES;
  TORCH_CHECK(words.numel() == need, "BitDelta serving words: ", words.numel(), " words for a [",
              out, ", ", in, "] matrix, which needs ", need);
}

// Packed signs (8 per byte, little-endian, over the flattened [out, in] matrix: the
// quantizer's file format) -> the nibble-lane words above.
at::Tensor repack(const at::Tensor& signs, int64_t out, int64_t in) {
  TORCH_CHECK(signs.scalar_type() == at::kByte && signs.is_contiguous(), "signs must be uint8");
  TORCH_CHECK(signs.numel() == (out * in + 7) / 8, "signs: ", signs.numel(), " bytes for a [",
              out, ", ", in, "] matrix, which needs ", (out * in + 7) / 8);
  const int64_t in_words = (in + CHUNK - 1) / CHUNK, blocks = (out + LANES - 1) / LANES;
  at::Tensor words = at::zeros({blocks * in_words * LANES}, signs.options().dtype(at::kInt));
  const uint8_t* s = signs.data_ptr<uint8_t>();
  uint32_t* w = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  at::parallel_for(0, out, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      uint32_t* row = w + (j / LANES) * in_words * LANES + j % LANES;
      for (int64_t k = 0; k < in; ++k) {
        const int64_t bit = j * in + k;
        if (s[bit >> 3] >> (bit & 7) & 1) row[(k / CHUNK) * LANES] |= 1u << (k % CHUNK);
      }
    }
  });
  return words;
}

// For every group g (rows idx[offs[g] .. offs[g+1]) of x and y) whose words[g] is not 0:
// y[row, :out] += alphas[g] * S_g x[row, :in], S_g the sign matrix at address words[g].
void apply(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx, const at::Tensor& offs,
           const at::Tensor& words, const at::Tensor& alphas, int64_t in, int64_t out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "x and y must be fp32");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.size(1) == in &&
                  y.size(1) == out, "x must be [n, in] and y [n, out]");
  TORCH_CHECK(idx.scalar_type() == at::kInt && offs.scalar_type() == at::kInt &&
                  words.scalar_type() == at::kLong && alphas.scalar_type() == at::kFloat,
              "idx, offs: int32; words: int64 addresses; alphas: fp32");
  const int64_t groups = words.numel();
  TORCH_CHECK(offs.numel() == groups + 1 && alphas.numel() == groups, "one offset pair and alpha per group");
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int32_t* of = offs.data_ptr<int32_t>();
  const int64_t* wp = words.data_ptr<int64_t>();
  const float* al = alphas.data_ptr<float>();
  TORCH_CHECK(of[0] >= 0 && of[groups] <= idx.numel(), "offsets out of range");
  for (int64_t p = of[0]; p < of[groups]; ++p)
    TORCH_CHECK(ix[p] >= 0 && ix[p] < x.size(0), "row index out of range");

  const int64_t in_words = (in + CHUNK - 1) / CHUNK, blocks = (out + LANES - 1) / LANES;
  const int64_t table_floats = in_words * NIB * 16;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();

  // rows that need tables, in group order; at most `max_rows` tables (a few MB) at a time
  std::vector<int64_t> rows, row_group;
  for (int64_t g = 0; g < groups; ++g)
    if (wp[g] != 0)
      for (int64_t p = of[g]; p < of[g + 1]; ++p) rows.push_back(p), row_group.push_back(g);
  const int64_t max_rows = std::max<int64_t>(8, (8 << 20) / (table_floats * 4));
  for (int64_t r0 = 0; r0 < int64_t(rows.size()); r0 += max_rows) {
    const int64_t n = std::min<int64_t>(max_rows, rows.size() - r0);
    auto tables = aligned_floats(n * table_floats);
    const int64_t grain_t = std::max<int64_t>(1, 4096 / std::max<int64_t>(in, 1));
    at::parallel_for(0, n, grain_t, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i)
        build_tables(xp + int64_t(ix[rows[r0 + i]]) * in, in, in_words, tables.get() + i * table_floats);
    });
    // runs of up to 4 rows of one group (first, count, group): they share the bit loads
    std::vector<int64_t> run_first, run_count, run_group;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t g = row_group[r0 + i];
      if (i > 0 && run_group.back() == g && run_count.back() < 4) {
        ++run_count.back();
      } else {
        run_first.push_back(i), run_count.push_back(1), run_group.push_back(g);
      }
    }
    // Work items: one run over a range of output blocks, so each variant's bits are read
    // as one stream; the inputs are taken WC words at a time, so the tables in use (R x
    // WC x 8 x 64 bytes) stay in L1 while the bits stream past.
    constexpr int64_t WC = 8;
    const int64_t runs = run_first.size();
    const int64_t per_item = std::max<int64_t>(1, std::min<int64_t>(blocks, (blocks * runs + 15) / 16));
    const int64_t spans = (blocks + per_item - 1) / per_item, items = runs * spans;
    const int64_t work = per_item * in_words * NIB * 4;  // permutes per item (at most)
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(work, 1));
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> part;
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t u = item / spans, ob0 = (item % spans) * per_item;
        const int64_t ob1 = std::min(blocks, ob0 + per_item);
        const int64_t g = run_group[u], cnt = run_count[u], first = run_first[u];
        const uint32_t* w = reinterpret_cast<const uint32_t*>(wp[g]);
        part.assign((ob1 - ob0) * 4 * LANES, 0.f);
        for (int64_t c0 = 0; c0 < in_words; c0 += WC) {
          const int64_t cw = std::min(WC, in_words - c0);
          const float* tabs[4];
          for (int64_t r = 0; r < cnt; ++r)
            tabs[r] = tables.get() + (first + r) * table_floats + c0 * NIB * 16;
          for (int64_t ob = ob0; ob < ob1; ++ob) {
            const uint32_t* wb = w + (ob * in_words + c0) * LANES;
            float* acc = part.data() + (ob - ob0) * 4 * LANES;
            switch (cnt) {
              case 1: block_rows<1>(wb, cw, tabs, acc); break;
              case 2: block_rows<2>(wb, cw, tabs, acc); break;
              case 3: block_rows<3>(wb, cw, tabs, acc); break;
              default: block_rows<4>(wb, cw, tabs, acc); break;
            }
          }
        }
        // rows of one run are distinct, and items of one run cover disjoint columns
        for (int64_t ob = ob0; ob < ob1; ++ob) {
          const int64_t lanes = std::min<int64_t>(LANES, out - ob * LANES);
          const float* acc = part.data() + (ob - ob0) * 4 * LANES;
          for (int64_t r = 0; r < cnt; ++r) {
            float* yr = yp + int64_t(ix[rows[r0 + first + r]]) * out + ob * LANES;
            for (int64_t l = 0; l < lanes; ++l) yr[l] += al[g] * acc[r * LANES + l];
          }
        }
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY(gym_bitdelta, m) {
  m.def("repack(Tensor signs, int out, int inp) -> Tensor", repack);
  m.def("apply(Tensor x, Tensor(a!) y, Tensor idx, Tensor offs, Tensor words, Tensor alphas, int inp, int out) -> ()",
        apply);
}

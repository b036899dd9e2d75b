// LoRA adapters applied per row, many adapters in one call (Punica's BGMV, on the CPU):
// for each group g of rows sharing an adapter, y[row] += s_g * B_g (A_g x[row]).
// A is stored [r, in] and B transposed, [r, out], so both products stream contiguous rows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

void apply(const at::Tensor& x, const at::Tensor& y, const at::Tensor& idx, const at::Tensor& offs,
           const at::Tensor& a_ptrs, const at::Tensor& bt_ptrs, const at::Tensor& ranks,
           const at::Tensor& scalings, int64_t in, int64_t out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "x and y must be fp32");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.size(1) == in &&
                  y.size(1) == out, "x must be [n, in] and y [n, out]");
  TORCH_CHECK(idx.scalar_type() == at::kInt && offs.scalar_type() == at::kInt &&
                  a_ptrs.scalar_type() == at::kLong && bt_ptrs.scalar_type() == at::kLong &&
                  ranks.scalar_type() == at::kLong && scalings.scalar_type() == at::kFloat,
              "idx, offs: int32; A, B addresses and ranks: int64; scalings: fp32");
  const int64_t groups = a_ptrs.numel();
  TORCH_CHECK(offs.numel() == groups + 1 && bt_ptrs.numel() == groups && ranks.numel() == groups &&
                  scalings.numel() == groups, "one entry per group");
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int32_t* of = offs.data_ptr<int32_t>();
  TORCH_CHECK(of[0] >= 0 && of[groups] <= idx.numel(), "offsets out of range");
  for (int64_t p = of[0]; p < of[groups]; ++p)
    TORCH_CHECK(ix[p] >= 0 && ix[p] < x.size(0), "row index out of range");
  const int64_t* ap = a_ptrs.data_ptr<int64_t>();
  const int64_t* bp = bt_ptrs.data_ptr<int64_t>();
  const int64_t* rk = ranks.data_ptr<int64_t>();
  const float* sc = scalings.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();

  std::vector<int64_t> rows, row_group;
  int64_t max_rank = 1, work = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (ap[g] == 0) continue;
    max_rank = std::max(max_rank, rk[g]);
    for (int64_t p = of[g]; p < of[g + 1]; ++p) rows.push_back(p), row_group.push_back(g);
  }
  work = max_rank * (in + out);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(work, 1));
  at::parallel_for(0, int64_t(rows.size()), grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(max_rank);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t g = row_group[i], r = rk[g];
      const float* a = reinterpret_cast<const float*>(ap[g]);
      const float* bt = reinterpret_cast<const float*>(bp[g]);
      const float* xr = xp + int64_t(ix[rows[i]]) * in;
      float* yr = yp + int64_t(ix[rows[i]]) * out;
      for (int64_t q = 0; q < r; ++q) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t k = 0; k < in; ++k) s += a[q * in + k] * xr[k];
        h[q] = sc[g] * s;
      }
      for (int64_t q = 0; q < r; ++q) {
        const float hq = h[q];
        const float* br = bt + q * out;
#pragma omp simd
        for (int64_t j = 0; j < out; ++j) yr[j] += hq * br[j];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(gym_lora, m) {
  m.def("apply(Tensor x, Tensor(a!) y, Tensor idx, Tensor offs, Tensor a, Tensor bt, Tensor ranks, Tensor scalings, int inp, int out) -> ()",
        apply);
}

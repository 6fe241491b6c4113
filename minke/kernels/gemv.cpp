// Decode's matrix-vector products on CPU: y (M, O) = x (M, K) @ wt (K, O) for one or two rows x.
//
// wt is the weight transposed and stored contiguous (kernels/linear.py's "t" layout), so the kernel
// reads it front to back, row after row, and the (M, O) outputs stay in L1: the one access pattern
// the hardware prefetcher streams at full speed. R rows of wt go together per pass over the outputs
// (R = 1 while the outputs are narrow enough to stay in L1 across rows, 8 above that). The compiler
// vectorizes the inner loop (built with -O3 -march=native for the machine it runs on). With more than
// one torch thread, K is split into one contiguous slice per thread, each summed into its own partial
// outputs, then added up. The reference is x @ wt (tests/test_fast_paths.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

template <int R>
void rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t O, int64_t k0, int64_t k1,
          int64_t ldx) {
  int64_t k = k0;
  for (; k + R <= k1; k += R) {
    for (int64_t m = 0; m < M; ++m) {
      float xs[R];
      for (int r = 0; r < R; ++r) xs[r] = x[m * ldx + k + r];
      float* __restrict__ ym = y + m * O;
      const float* __restrict__ wk = w + k * O;
#pragma GCC ivdep
      for (int64_t o = 0; o < O; ++o) {
        float a = ym[o];
        for (int r = 0; r < R; ++r) a += xs[r] * wk[r * O + o];
        ym[o] = a;
      }
    }
  }
  for (; k < k1; ++k) {
    for (int64_t m = 0; m < M; ++m) {
      const float xk = x[m * ldx + k];
      float* __restrict__ ym = y + m * O;
      const float* __restrict__ wk = w + k * O;
      for (int64_t o = 0; o < O; ++o) ym[o] += xk * wk[o];
    }
  }
}

void slice(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t O, int64_t k0, int64_t k1,
           int64_t ldx) {
  std::fill(y, y + M * O, 0.f);
  if (O <= 768)
    rows<1>(x, w, y, M, K, O, k0, k1, ldx);
  else
    rows<8>(x, w, y, M, K, O, k0, k1, ldx);
}

}  // namespace

// x (M, K) fp32 with unit stride along K, wt (K, O) fp32 contiguous, bias (O,) or None → (M, O).
torch::Tensor linear_t(const torch::Tensor& x, const torch::Tensor& wt, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0), "linear_t: x (M, K) and wt (K, O)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && wt.scalar_type() == at::kFloat, "linear_t: fp32 only");
  TORCH_CHECK(x.stride(1) == 1 && wt.is_contiguous(), "linear_t: x rows and wt must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), O = wt.size(1);
  auto y = torch::empty({M, O}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, K * O / (1 << 18)));
  if (parts <= 1) {
    slice(xp, wp, yp, M, K, O, 0, K, x.stride(0));
  } else {
    std::vector<float> partial((parts - 1) * M * O);
    const int64_t step = (K + parts - 1) / parts;
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t k0 = p * step, k1 = std::min(K, k0 + step);
        slice(xp, wp, p == 0 ? yp : partial.data() + (p - 1) * M * O, M, K, O, k0, k1, x.stride(0));
      }
    });
    for (int64_t p = 1; p < parts; ++p) {
      const float* part = partial.data() + (p - 1) * M * O;
      for (int64_t i = 0; i < M * O; ++i) yp[i] += part[i];
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_t", &linear_t, "y = x @ wt (+ bias) for decode's few rows, wt (K, O) contiguous");
}

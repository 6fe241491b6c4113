// Decode's kernels on CPU, fp32: its matrix-vector products and MLA's absorbed attention for one query
// token; in bf16, MLA's weight folds for one token (from bf16 or E4M3 weights) and products with FP8
// (E4M3) weights as stored; DSA's lightning-indexer scores in bf16 and fp32 and its top-k
// (index_scores, top_k, for decode and prefill); and DSA's gather of selected cache rows (any dtype).
// Each has its plain torch reference in the tests (tests/test_fast_paths.py, tests/test_kernels.py,
// tests/test_dsa.py, tests/test_fp8.py).
//
// Every decode kernel reads its big operand (a weight, the cached latents) once, front to back, in the
// one access pattern the hardware prefetcher streams at full speed; what it accumulates stays in L1. The
// compiler vectorizes the inner loops (built with -O3 -march=native for the machine it runs on;
// -fopenmp runs at::parallel_for on torch's threads and lets the dot products' `omp simd reduction`
// reassociate).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), name, ": fp32 on the CPU only");
  TORCH_CHECK(t.stride(-1) == 1, name, ": rows must be contiguous");
}

void check_bf16(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && t.is_contiguous(), name,
              ": bf16, contiguous, on the CPU");
}

// y (M, O) += x (M, K)[:, k0:k1] @ w (K, O)[k0:k1]: R rows of w per pass over the outputs.
template <int R>
void rows(const float* x, const float* w, float* y, int64_t M, int64_t O, int64_t k0, int64_t k1, int64_t ldx) {
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

// y (M, O) = x[:, k0:k1] @ w[k0:k1]. One row of w per pass while the outputs are narrow (they stay in
// L1 across rows), 8 above that.
void slice(const float* x, const float* w, float* y, int64_t M, int64_t O, int64_t k0, int64_t k1, int64_t ldx) {
  std::fill(y, y + M * O, 0.f);
  if (O <= 768)
    rows<1>(x, w, y, M, O, k0, k1, ldx);
  else
    rows<8>(x, w, y, M, O, k0, k1, ldx);
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

// linear_t: x (M, K) fp32 with contiguous rows, wt (K, O) fp32 contiguous (kernels/linear.py's "t"
// layout: the weight transposed), bias (O,) or None → (M, O) = x @ wt + bias, for decode's one or two
// rows. With more than one torch thread, K is split into one contiguous slice per thread, each summed
// into its own partial outputs, then added up.
torch::Tensor linear_t(const torch::Tensor& x, const torch::Tensor& wt, const c10::optional<torch::Tensor>& bias) {
  check_f32(x, "linear_t x");
  check_f32(wt, "linear_t wt");
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0) && wt.is_contiguous(),
              "linear_t: x (M, K) and wt (K, O) contiguous");
  const int64_t M = x.size(0), K = x.size(1), O = wt.size(1);
  auto y = torch::empty({M, O}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, K * O / (1 << 18)));
  if (parts <= 1) {
    slice(xp, wp, yp, M, O, 0, K, x.stride(0));
  } else {
    std::vector<float> partial((parts - 1) * M * O);
    const int64_t step = (K + parts - 1) / parts;
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t k0 = std::min(K, p * step), k1 = std::min(K, k0 + step);
        slice(xp, wp, p == 0 ? yp : partial.data() + (p - 1) * M * O, M, O, k0, k1, x.stride(0));
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

// absorb_value in bf16: o (H, C), w (H, N+V, C) → (H, V), where AVX512-BF16 is (has_bf16_dot(); C a
// multiple of 32): pair dot products along C (vdpbf16ps), the products of the bf16 values summed in
// fp32 and rounded to bf16 once, as torch's bf16 bmm computes them; threads split the heads, and each
// head's rows are read once, front to back. With N = 0 and w (H, C', C) a head's C' rows, it is also
// the query fold in bf16: kernels/attention.py passes the key half transposed, (H, C, N) contiguous
// (rows in the order it reads them: kv_b's own layout streamed at 0.5 of memory speed, tried).
torch::Tensor absorb_value_bf16(const torch::Tensor& o, const torch::Tensor& w, int64_t N) {
  check_bf16(o, "absorb_value o");
  check_bf16(w, "absorb_value w");
  TORCH_CHECK(o.dim() == 2 && w.dim() == 3 && o.size(0) == w.size(0) && o.size(1) == w.size(2) && 0 <= N &&
                  N < w.size(1) && w.size(2) % 32 == 0,
              "absorb_value: o (H, C) and w (H, N+V, C), C a multiple of 32");
  const int64_t H = o.size(0), C = o.size(1), V = w.size(1) - N;
  auto y = torch::empty({H, V}, o.options());
#ifdef __AVX512BF16__
  const at::BFloat16* op = o.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, H, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) {
      const at::BFloat16* oh = op + h * C;
      const at::BFloat16* wh = wp + (h * w.size(1) + N) * C;
      for (int64_t v = 0; v < V; ++v) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 32) {  // two chains: each dot product's latency hidden
          const auto wv = (__m512bh)_mm512_loadu_si512(wh + v * C + c);
          const auto ov = (__m512bh)_mm512_loadu_si512(oh + c);
          if ((c / 32) % 2) a1 = _mm512_dpbf16_ps(a1, wv, ov); else a0 = _mm512_dpbf16_ps(a0, wv, ov);
        }
        yp[h * V + v] = at::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
      }
    }
  });
#else
  TORCH_CHECK(false, "absorb_value: bf16 needs a build with AVX512-BF16 (has_bf16_dot() is false)");
#endif
  return y;
}

// MLA's weight folds (mla.py attend_absorbed) for one query token. w (H, N+V, C) contiguous is
// kv_b_proj's weight by head: rows [:N] the key half, rows [N:] the value half.
// absorb_query: q_nope (H, N) → q_lat (H, C), q_lat[h] = q_nope[h] @ w[h, :N].
torch::Tensor absorb_query(const torch::Tensor& q, const torch::Tensor& w) {
  check_f32(q, "absorb_query q");
  check_f32(w, "absorb_query w");
  TORCH_CHECK(q.dim() == 2 && w.dim() == 3 && w.is_contiguous() && q.size(0) == w.size(0) && q.size(1) <= w.size(1),
              "absorb_query: q (H, N) and w (H, N+V, C) contiguous");
  const int64_t H = q.size(0), N = q.size(1), C = w.size(2);
  auto y = torch::empty({H, C}, q.options());
  for (int64_t h = 0; h < H; ++h)
    slice(q.data_ptr<float>() + h * q.stride(0), w.data_ptr<float>() + h * w.stride(0), y.data_ptr<float>() + h * C,
          1, C, 0, N, N);
  return y;
}

// absorb_value: o_lat (H, C) → o (H, V), o[h][v] = w[h, N + v] · o_lat[h].
torch::Tensor absorb_value(const torch::Tensor& o, const torch::Tensor& w, int64_t N) {
  if (o.scalar_type() == at::kBFloat16) return absorb_value_bf16(o, w, N);
  check_f32(o, "absorb_value o");
  check_f32(w, "absorb_value w");
  TORCH_CHECK(o.dim() == 2 && w.dim() == 3 && w.is_contiguous() && o.size(0) == w.size(0) && o.size(1) == w.size(2) &&
                  0 <= N && N < w.size(1),
              "absorb_value: o (H, C) and w (H, N+V, C) contiguous");
  const int64_t H = o.size(0), C = o.size(1), V = w.size(1) - N;
  auto y = torch::empty({H, V}, o.options());
  for (int64_t h = 0; h < H; ++h) {
    const float* oh = o.data_ptr<float>() + h * o.stride(0);
    const float* wh = w.data_ptr<float>() + (h * w.size(1) + N) * C;
    float* yh = y.data_ptr<float>() + h * V;
    for (int64_t v = 0; v < V; ++v) yh[v] = dot(wh + v * C, oh, C);
  }
  return y;
}

// latent_attention: MLA's absorbed (MQA) attention of Q queries (one token's heads) over all S cached
// tokens: o[q] = softmax_s(scale · (q_lat[q]·c_kv[s] + q_pe[q]·k_pe[s])) · c_kv[s].
// q_lat (Q, C), q_pe (Q, R), c_kv (S, C), k_pe (S, R) (rows contiguous, any row stride; C and R
// multiples of 16) → (Q, C). One pass over the cache in blocks of BLOCK tokens, with flash-decoding's
// online softmax: a block's scores for every query (each token's latent read once, for G queries at a
// time with G independent accumulators), then its weighted latents added into the outputs (the block
// still in L1/L2, four 16-wide output chunks held in registers across its tokens), rescaled whenever
// a query's running maximum grows.
namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats, unaligned loads allowed
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
constexpr int64_t BLOCK = 32;

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline v16 splat(float x) { return v16{} + x; }

// e^x for x <= 0 (a softmax's shifted scores), 16 at a time: x = n·ln2 + r with |r| <= ln2/2, e^r by its
// degree-6 Taylor polynomial (relative error < 3e-7 there), 2^n built in the exponent bits. Below -87
// it returns e^-87 (~2e-38) instead of 0, which no softmax sum notices. libm's expf is not vectorized
// without -ffast-math, which this file is not built with.
inline v16 vexp(v16 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const v16 n = (x * splat(1.44269504f) + splat(12582912.f)) - splat(12582912.f);  // round to nearest
  const v16 r = (x - n * splat(0.693145752f)) - n * splat(1.42860677e-6f);  // ln2 in two parts
  v16 p = splat(1.f / 720);
  p = p * r + splat(1.f / 120);
  p = p * r + splat(1.f / 24);
  p = p * r + splat(1.f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * (v16)bits;  // a same-size vector cast reinterprets the bits
}
// v + v with its lanes permuted by the mask (GCC's and clang's spellings of a register shuffle)
#if defined(__clang__)
#define SHUFFLE_ADD(v, ...) ((v) + __builtin_shufflevector((v), (v), __VA_ARGS__))
#else
#define SHUFFLE_ADD(v, ...) ((v) + __builtin_shuffle((v), v16i{__VA_ARGS__}))
#endif
inline float hsum(v16 v) {  // a butterfly in registers, not 16 dependent adds
  v = SHUFFLE_ADD(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = SHUFFLE_ADD(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = SHUFFLE_ADD(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = SHUFFLE_ADD(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// p[t * BLOCK + j] = scale · (ql[t]·c + qr[t]·r) for G queries t (rows ldq / ldr apart)
template <int G>
inline void scores(const float* ql, int64_t ldq, const float* qr, int64_t ldr, const float* c, const float* r,
                   int64_t C, int64_t R, float sc, float* p, int64_t j) {
  v16 a[G];
  for (int t = 0; t < G; ++t) a[t] = v16{};
  for (int64_t i = 0; i < C; i += 16) {
    const v16 cv = load(c + i);
    for (int t = 0; t < G; ++t) a[t] += load(ql + t * ldq + i) * cv;
  }
  for (int64_t i = 0; i < R; i += 16) {
    const v16 rv = load(r + i);
    for (int t = 0; t < G; ++t) a[t] += load(qr + t * ldr + i) * rv;
  }
  for (int t = 0; t < G; ++t) p[t * BLOCK + j] = sc * hsum(a[t]);
}

// a[0:16U] = keep · a + Σ_j p[j] · c[j·ldc + 0:16U] over a block's n tokens, U chunks of a in registers
template <int U>
inline void accumulate(float* a, const float* c, int64_t ldc, const float* p, int64_t n, float keep) {
  v16 o[U];
  for (int u = 0; u < U; ++u) o[u] = load(a + 16 * u) * keep;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    for (int u = 0; u < U; ++u) o[u] += pj * load(c + j * ldc + 16 * u);
  }
  for (int u = 0; u < U; ++u) *reinterpret_cast<v16*>(a + 16 * u) = o[u];
}

}  // namespace

torch::Tensor latent_attention(const torch::Tensor& q_lat, const torch::Tensor& q_pe, const torch::Tensor& c_kv,
                               const torch::Tensor& k_pe, double scale) {
  check_f32(q_lat, "latent_attention q_lat");
  check_f32(q_pe, "latent_attention q_pe");
  check_f32(c_kv, "latent_attention c_kv");
  check_f32(k_pe, "latent_attention k_pe");
  TORCH_CHECK(q_lat.dim() == 2 && q_pe.dim() == 2 && c_kv.dim() == 2 && k_pe.dim() == 2 && q_lat.size(0) == q_pe.size(0) &&
                  q_lat.size(1) == c_kv.size(1) && q_pe.size(1) == k_pe.size(1) && c_kv.size(0) == k_pe.size(0),
              "latent_attention: q_lat (Q, C), q_pe (Q, R), c_kv (S, C), k_pe (S, R)");
  const int64_t Q = q_lat.size(0), C = q_lat.size(1), R = q_pe.size(1), S = c_kv.size(0);
  TORCH_CHECK(S > 0, "latent_attention: no cached tokens");
  TORCH_CHECK(C % 16 == 0 && R % 16 == 0, "latent_attention: C and R must be multiples of 16");
  const int64_t lc = c_kv.stride(0), lr = k_pe.stride(0), lq = q_lat.stride(0), lp = q_pe.stride(0);
  const float* ql = q_lat.data_ptr<float>();
  const float* qr = q_pe.data_ptr<float>();
  const float* cp = c_kv.data_ptr<float>();
  const float* rp = k_pe.data_ptr<float>();
  auto out = torch::zeros({Q, C}, q_lat.options());
  float* acc = out.data_ptr<float>();
  std::vector<float> mx(Q, -std::numeric_limits<float>::infinity()), sum(Q, 0.f), keeps(Q), p(Q * BLOCK);
  const float sc = static_cast<float>(scale);
  for (int64_t s0 = 0; s0 < S; s0 += BLOCK) {
    const int64_t n = std::min(BLOCK, S - s0);
    for (int64_t j = 0; j < n; ++j) {
      const float* c = cp + (s0 + j) * lc;
      const float* r = rp + (s0 + j) * lr;
      int64_t q = 0;
      for (; q + 4 <= Q; q += 4) scores<4>(ql + q * lq, lq, qr + q * lp, lp, c, r, C, R, sc, p.data() + q * BLOCK, j);
      for (; q < Q; ++q) scores<1>(ql + q * lq, lq, qr + q * lp, lp, c, r, C, R, sc, p.data() + q * BLOCK, j);
    }
    for (int64_t q = 0; q < Q; ++q) {
      float* pq = p.data() + q * BLOCK;
      float m = mx[q];
      for (int64_t j = 0; j < n; ++j) m = std::max(m, pq[j]);
      const float keep = std::exp(mx[q] - m);  // 0 on the first block (mx = -inf)
      float t = 0.f;
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) {
        const v16 e = vexp(load(pq + j) - splat(m));
        *reinterpret_cast<v16*>(pq + j) = e;
        t += hsum(e);
      }
      for (; j < n; ++j) t += (pq[j] = std::exp(pq[j] - m));
      sum[q] = sum[q] * keep + t;
      mx[q] = m;
      keeps[q] = keep;
    }
    // weighted latents: a 64-float column of the block at a time for every query (it stays in L1)
    const float* cb = cp + s0 * lc;
    int64_t i = 0;
    for (; i + 64 <= C; i += 64)
      for (int64_t q = 0; q < Q; ++q) accumulate<4>(acc + q * C + i, cb + i, lc, p.data() + q * BLOCK, n, keeps[q]);
    for (; i < C; i += 16)
      for (int64_t q = 0; q < Q; ++q) accumulate<1>(acc + q * C + i, cb + i, lc, p.data() + q * BLOCK, n, keeps[q]);
  }
  for (int64_t q = 0; q < Q; ++q) {
    const float inv = 1.f / sum[q];
    float* a = acc + q * C;
    for (int64_t i = 0; i < C; ++i) a[i] *= inv;
  }
  return out;
}

// moe_tokens: DeepSeekMoE's routed output for a few tokens, x (N, D) → (N, D) = Σ_j w[n, j] · E_idx[n, j](x[n])
// with each SwiGLU expert e given as gate_up[e] (D, 2I) = [gate; up]ᵀ and down[e] (I, D) = downᵀ, both
// contiguous (kernels/linear.py's "t" layout): the gate's choice and weights w (N, K) fp32, idx (N, K).
// What grouped_moe does for many tokens (sort by expert, one GEMM per expert, unsort, weigh, sum) in
// one call per layer: each chosen expert's two GEMVs with its activation between.
torch::Tensor moe_tokens(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& idx,
                         const std::vector<torch::Tensor>& gate_up, const std::vector<torch::Tensor>& down) {
  check_f32(x, "moe_tokens x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && idx.sizes() == w.sizes() && w.size(0) == x.size(0) &&
                  w.scalar_type() == at::kFloat && idx.scalar_type() == at::kLong && w.is_contiguous() &&
                  idx.is_contiguous() && gate_up.size() == down.size() && !gate_up.empty(),
              "moe_tokens: x (N, D), w (N, K) fp32, idx (N, K) int64, one gate_up and down per expert");
  const int64_t N = x.size(0), D = x.size(1), K = w.size(1), E = gate_up.size(), I = down[0].size(0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(gate_up[e].scalar_type() == at::kFloat && down[e].scalar_type() == at::kFloat &&
                    gate_up[e].is_contiguous() && down[e].is_contiguous() && gate_up[e].size(0) == D &&
                    gate_up[e].size(1) == 2 * I && down[e].size(0) == I && down[e].size(1) == D,
                "moe_tokens: expert ", e, " needs gate_up (D, 2I) and down (I, D), fp32 contiguous");
  }
  auto out = torch::zeros({N, D}, x.options());
  std::vector<float> h(2 * I), y(D);
  const float* wp = w.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x.data_ptr<float>() + n * x.stride(0);
    float* on = out.data_ptr<float>() + n * D;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = ip[n * K + j];
      TORCH_CHECK(0 <= e && e < E, "moe_tokens: expert id ", e, " outside 0..", E - 1);
      slice(xn, gate_up[e].data_ptr<float>(), h.data(), 1, 2 * I, 0, D, D);
      for (int64_t i = 0; i < I; ++i) h[i] = h[i] / (1.f + std::exp(-h[i])) * h[I + i];  // silu(gate) · up
      slice(h.data(), down[e].data_ptr<float>(), y.data(), 1, D, 0, I, I);
      const float g = wp[n * K + j];
      for (int64_t d = 0; d < D; ++d) on[d] += g * y[d];
    }
  }
  return out;
}

// rms_norm: x (M, D) → w · x / rms(x) per row, rms(x) = sqrt(mean(x²) + eps): model/layers.py's RMSNorm
// for fp32 rows (one op instead of its seven).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_f32(x, "rms_norm x");
  check_f32(w, "rms_norm w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), "rms_norm: x (M, D), w (D,)");
  const int64_t M = x.size(0), D = x.size(1);
  auto y = torch::empty({M, D}, x.options());
  const float* wp = w.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * x.stride(0);
    float* ym = y.data_ptr<float>() + m * D;
    const float r = 1.f / std::sqrt(dot(xm, xm, D) / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t i = 0; i < D; ++i) ym[i] = wp[i] * (xm[i] * r);
  }
  return y;
}

// sigmoid_gate: DeepSeek-V3's router (model/moe.py Gate, topk_method noaux_tc, scoring sigmoid) for a few
// fp32 tokens: scores s = sigmoid(x · Wᵀ); the choice c = s + bias picks, within the topk_group groups
// whose two best c sum highest, the k experts of highest c; their weights are s (normalized over them
// when ``norm``) times ``scale``. x (N, D), W (E, D), bias (E,) fp32 → [w (N, k), idx (N, k) int64 by
// descending c, scores (N, E)]. Equal values go to the lower index (torch.topk leaves ties unspecified).
std::vector<torch::Tensor> sigmoid_gate(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& bias,
                                        int64_t n_group, int64_t topk_group, int64_t k, bool norm, double scale) {
  check_f32(x, "sigmoid_gate x");
  check_f32(W, "sigmoid_gate W");
  check_f32(bias, "sigmoid_gate bias");
  const int64_t N = x.size(0), D = x.size(1), E = W.size(0);
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && W.size(1) == D && W.is_contiguous() && bias.numel() == E &&
                  n_group >= 1 && E % n_group == 0 && 1 <= topk_group && topk_group <= n_group && 1 <= k &&
                  k <= E / n_group * topk_group && (n_group == 1 || E / n_group >= 2),
              "sigmoid_gate: x (N, D), W (E, D), bias (E,), E divisible into n_group groups of >= 2, "
              "k within the kept groups");
  auto scores = torch::empty({N, E}, x.options());
  auto wout = torch::empty({N, k}, x.options());
  auto iout = torch::empty({N, k}, x.options().dtype(at::kLong));
  const float* b = bias.data_ptr<float>();
  const int64_t per = E / n_group;
  std::vector<float> c(E), gs(n_group);
  std::vector<int64_t> order(std::max(E, n_group));
  auto by_desc = [](const std::vector<float>& v) {  // higher first, then the lower index
    return [&v](int64_t i, int64_t j) { return v[i] > v[j] || (v[i] == v[j] && i < j); };
  };
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x.data_ptr<float>() + n * x.stride(0);
    float* sn = scores.data_ptr<float>() + n * E;
    for (int64_t e = 0; e < E; ++e) {
      sn[e] = 1.f / (1.f + std::exp(-dot(xn, W.data_ptr<float>() + e * D, D)));
      c[e] = sn[e] + b[e];
    }
    if (n_group > 1) {
      for (int64_t g = 0; g < n_group; ++g) {  // the sum of the group's two best choices
        float a = -std::numeric_limits<float>::infinity(), a2 = a;
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          if (c[e] > a) { a2 = a; a = c[e]; } else if (c[e] > a2) { a2 = c[e]; }
        }
        gs[g] = a + a2;
      }
      std::vector<int64_t> go(n_group);
      for (int64_t g = 0; g < n_group; ++g) go[g] = g;
      std::partial_sort(go.begin(), go.begin() + topk_group, go.end(), by_desc(gs));
      std::vector<bool> kept(n_group, false);
      for (int64_t g = 0; g < topk_group; ++g) kept[go[g]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!kept[e / per]) c[e] = -std::numeric_limits<float>::infinity();
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.begin() + E, by_desc(c));
    float total = 0.f;
    for (int64_t j = 0; j < k; ++j) total += sn[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      const float v = sn[order[j]];
      wout.data_ptr<float>()[n * k + j] = (norm ? v / (total + 1e-20f) : v) * static_cast<float>(scale);
      iout.data_ptr<int64_t>()[n * k + j] = order[j];
    }
  }
  return {wout, iout, scores};
}

// index_scores: DeepSeek-V3.2's lightning-indexer scores I (T, S) = Σ_j w[t, j] · max(0, q[t, j] · k[s])
// for bf16 q (T, J, E) and keys k (S, E), w (T, J) fp32 (model/dsa.py, kernels/attention.py
// index_scores): the products of the bf16 values summed in fp32, as torch computes them after casting
// both to fp32, but with AVX512-BF16's pair dot products (vdpbf16ps: twice fp32's multiply-adds per
// instruction) and without writing the (T, J, S) products out. Vector lanes are heads: each query is
// first laid out by pair of dimensions, (E/2, J) padded to 16 heads, in a buffer in L1; each key's pair
// is broadcast against it, 4 keys at a time over 64 heads (16 accumulators). Threads split the keys.
bool has_bf16_dot() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

#ifdef __AVX512BF16__
// out[0..KB) += Σ_heads w · max(0, q · k) for KB keys (rows of P pairs) over NV vectors of 16 heads.
template <int NV, int KB>
inline void keys_pass(const uint32_t* qT, int64_t ldq, const float* w, const uint32_t* k, int64_t P, float* out) {
  // Every loop over kb and v is unrolled, so that the accumulators live in registers (not on the stack).
  __m512 a[KB][NV];
#pragma GCC unroll 4
  for (int kb = 0; kb < KB; ++kb)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[kb][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh qv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) qv[v] = (__m512bh)_mm512_loadu_si512(qT + p * ldq + v * 16);
#pragma GCC unroll 4
    for (int kb = 0; kb < KB; ++kb) {
      const __m512bh kv = (__m512bh)_mm512_set1_epi32(static_cast<int>(k[kb * P + p]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[kb][v] = _mm512_dpbf16_ps(a[kb][v], qv[v], kv);
    }
  }
#pragma GCC unroll 4
  for (int kb = 0; kb < KB; ++kb) {
    __m512 r = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      // max(0, a) in this order returns a NaN a, as torch's relu does
      r = _mm512_fmadd_ps(_mm512_max_ps(_mm512_setzero_ps(), a[kb][v]), _mm512_loadu_ps(w + v * 16), r);
    out[kb] += _mm512_reduce_add_ps(r);
  }
}

#endif

// The same in fp32 (fp32 models: the products summed in fp32, as torch's fp32 GEMM, up to order), with
// the portable 16-float vectors: each query laid out (E, heads) in a buffer, each key's dimension
// broadcast against it, 4 keys × 64 heads a pass.
template <int NV, int KB>
inline void keys_pass(const float* qT, int64_t ldq, const float* w, const float* k, int64_t E, float* out) {
  v16 a[KB][NV];
#pragma GCC unroll 4
  for (int kb = 0; kb < KB; ++kb)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[kb][v] = v16{};
  for (int64_t e = 0; e < E; ++e) {
    v16 qv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      qv[v] = load(qT + e * ldq + v * 16);
#ifdef __AVX512F__  // one 16-float vector is one zmm register; on AVX2 it is two, and "+v" cannot hold it
      asm("" : "+v"(qv[v]));  // keep it in a register: folded into each FMA, it was loaded once per key
#endif
    }
#pragma GCC unroll 4
    for (int kb = 0; kb < KB; ++kb) {
      const float kk = k[kb * E + e];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[kb][v] += qv[v] * kk;
    }
  }
#pragma GCC unroll 4
  for (int kb = 0; kb < KB; ++kb) {
    v16 r = v16{};
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) r += (a[kb][v] < 0.f ? v16{} : a[kb][v]) * load(w + v * 16);  // relu keeps a NaN
    out[kb] += hsum(r);
  }
}

// out[0..KB) = the scores of KB keys (rows of D units: floats, or uint32 pairs of bf16) over every head:
// heads in groups of 4 vectors (64 heads), one keys_pass each (the overload for the unit).
template <int KB, typename U>
inline void keys_all_heads(const U* qT, int64_t ldq, const float* w, const U* k, int64_t D, int64_t JV, float* out) {
  for (int kb = 0; kb < KB; ++kb) out[kb] = 0.f;
  for (int64_t g = 0; g < JV; g += 4) {
    const int64_t o = g * 16;
    switch (std::min<int64_t>(4, JV - g)) {
      case 4: keys_pass<4, KB>(qT + o, ldq, w + o, k, D, out); break;
      case 3: keys_pass<3, KB>(qT + o, ldq, w + o, k, D, out); break;
      case 2: keys_pass<2, KB>(qT + o, ldq, w + o, k, D, out); break;
      default: keys_pass<1, KB>(qT + o, ldq, w + o, k, D, out);
    }
  }
}

// index_scores' loop for either kernel: U is a row's unit (a float, or a uint32 pair of bf16), D the
// units per row; keys_all_heads scores 4 keys (or 1) over every head. The queries
// are laid out once, each (D, heads padded to 16); threads split the keys, and take them a block of
// SCORE_KEYS at a time (in L2) against every query, so that a prefill block's 64 queries do not each
// stream the whole history from memory (which made the fp32 kernel 0.8x torch's GEMM there).
constexpr int64_t SCORE_KEYS = 256;

template <typename U>
void score_keys(const U* qp, const float* wp, const U* kp, int64_t T, int64_t J, int64_t D, int64_t S, float* op) {
  const int64_t JV = (J + 15) / 16, ldq = JV * 16;
  std::vector<U> qT(T * D * ldq, U(0));
  std::vector<float> wt(T * ldq, 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < J; ++j) {
      for (int64_t d = 0; d < D; ++d) qT[(t * D + d) * ldq + j] = qp[(t * J + j) * D + d];
      wt[t * ldq + j] = wp[t * J + j];
    }
  at::parallel_for(0, S, 64, [&](int64_t b, int64_t e) {
    for (int64_t s0 = b; s0 < e; s0 += SCORE_KEYS) {
      const int64_t s1 = std::min(e, s0 + SCORE_KEYS);
      for (int64_t t = 0; t < T; ++t) {
        const U* q = qT.data() + t * D * ldq;
        const float* w = wt.data() + t * ldq;
        float* ot = op + t * S;
        int64_t s = s0;
        for (; s + 4 <= s1; s += 4) keys_all_heads<4>(q, ldq, w, kp + s * D, D, JV, ot + s);
        for (; s < s1; ++s) keys_all_heads<1>(q, ldq, w, kp + s * D, D, JV, ot + s);
      }
    }
  });
}

torch::Tensor index_scores(const torch::Tensor& q, const torch::Tensor& w, const torch::Tensor& k) {
  TORCH_CHECK(q.dim() == 3 && w.dim() == 2 && k.dim() == 2 && w.size(0) == q.size(0) && w.size(1) == q.size(1) &&
                  k.size(1) == q.size(2),
              "index_scores: q (T, J, E), w (T, J), k (S, E)");
  if (q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && q.device().is_cpu() && k.device().is_cpu() && w.device().is_cpu() &&
                    q.is_contiguous() && k.is_contiguous() && w.is_contiguous(),
                "index_scores: q, k and w fp32, contiguous, on the CPU");
    auto out = torch::empty({q.size(0), k.size(0)}, w.options());
    score_keys(q.data_ptr<float>(), w.data_ptr<float>(), k.data_ptr<float>(), q.size(0), q.size(1), q.size(2),
               k.size(0), out.data_ptr<float>());
    return out;
  }
  TORCH_CHECK(q.size(2) % 2 == 0, "index_scores: bf16 needs an even E");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat &&
                  q.device().is_cpu() && k.device().is_cpu() && w.device().is_cpu() && q.is_contiguous() &&
                  k.is_contiguous() && w.is_contiguous(),
              "index_scores: q and k bf16, w fp32, contiguous, on the CPU");
  auto out = torch::empty({q.size(0), k.size(0)}, w.options());
#ifdef __AVX512BF16__
  score_keys(reinterpret_cast<const uint32_t*>(q.data_ptr<at::BFloat16>()), w.data_ptr<float>(),  // pairs of dims
             reinterpret_cast<const uint32_t*>(k.data_ptr<at::BFloat16>()), q.size(0), q.size(1), q.size(2) / 2,
             k.size(0), out.data_ptr<float>());
#else
  TORCH_CHECK(false, "index_scores: built without AVX512-BF16 (has_bf16_dot() is false)");
#endif
  return out;
}

// fp8_linear: y (M, O) = x (M, K) @ Wᵀ for decode's few bf16 rows, with W held as DeepSeek's checkpoints
// store it: q (O, K) float8_e4m3fn and one fp32 scale per 128×128 block, s (⌈O/128⌉, ⌈K/128⌉), W = q · s
// (quant/modules.py FP8Linear). Where AVX512-BF16 and AVX512-VBMI are (has_fp8_dot(); K a multiple of
// 64), each 64 weights are widened to bf16 in registers, exactly (every E4M3 value is a bf16): two byte
// lookups in 128-entry tables (vpermi2b) give each weight's high and low byte, the sign is put back,
// and the bytes are interleaved into words within 128-bit lanes. That interleave permutes the 64 k's,
// so each row of x is laid out once in the same order; the pair dot products (vdpbf16ps) sum in fp32,
// a block's sum is multiplied by its scale, and y is rounded to bf16 once. The weight is read once,
// front to back, at one byte a weight: half of what the bf16 GEMV reads. One row of x (a decode step of
// one sequence) reads a weight row at a time (fp8_row); more rows take R outputs per pass for each line
// read, each line prefetched two passes ahead (the hardware prefetcher alone streamed rows of 1536
// bytes at about half of memory speed). Threads split the outputs.
bool has_fp8_dot() {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  return true;
#else
  return false;
#endif
}

// E4M3's value of byte v (sign bit 7, 4 exponent bits with bias 7, 3 mantissa bits; 0x7F and 0xFF NaN),
// made on the bits without branches or a table, so that a loop of it vectorizes (a loop of table lookups
// took 3x longer, measured): a normal value moves its exponent and mantissa into fp32's fields (bias
// 7 → 127), a subnormal one is m · 2⁻⁹.
inline float e4m3_value(uint32_t v) {
  const uint32_t a = v & 0x7Fu, normal = (a << 20) + (120u << 23);
  const float sub = float(int32_t(a)) * 0.001953125f;  // a < 8: exponent 0, a = m
  uint32_t sb;
  std::memcpy(&sb, &sub, 4);
  const uint32_t is_sub = 0u - uint32_t(a < 8u), is_nan = 0u - uint32_t(a == 0x7Fu);
  const uint32_t bits = ((((sb & is_sub) | (normal & ~is_sub)) & ~is_nan) | (0x7FC00000u & is_nan)) | ((v & 0x80u) << 24);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
// The bf16 bits of E4M3's 128 magnitudes (bits 6..0: 4 exponent bits, bias 7, and 3 mantissa bits), split
// into high and low bytes, 64 bytes a register.
struct E4M3Tables {
  __m512i hi0, hi1, lo0, lo1;
  E4M3Tables() {
    alignas(64) uint8_t hi[128], lo[128];
    for (int v = 0; v < 128; ++v) {
      const float f = e4m3_value(v);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      hi[v] = uint8_t(bits >> 24), lo[v] = uint8_t(bits >> 16);  // exact: at most 4 significant bits
    }
    hi0 = _mm512_load_si512(hi), hi1 = _mm512_load_si512(hi + 64);
    lo0 = _mm512_load_si512(lo), lo1 = _mm512_load_si512(lo + 64);
  }
};

// 64 E4M3 weights → two vectors of 32 bf16: words (16j + i) and (16j + 8 + i), j < 4, i < 8.
inline void widen_e4m3(const uint8_t* p, const E4M3Tables& t, __m512bh& a, __m512bh& b) {
  const __m512i v = _mm512_loadu_si512(p);
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.hi0, v, t.hi1), v,
                                               _mm512_set1_epi8(char(0x80)), 0xF8);  // hi | (v & 0x80)
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, v, t.lo1);
  a = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
  b = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

const E4M3Tables& e4m3_tables() {
  static const E4M3Tables t;
  return t;
}

// x (rows, K) contiguous bf16, K a multiple of 64 → its rows laid out as widen_e4m3 orders the weights:
// per 64 k, words 16j + i first, then 16j + 8 + i.
torch::Tensor fp8_layout(const torch::Tensor& x) {
  auto xl = torch::empty_like(x);
  const at::BFloat16* xs = x.data_ptr<at::BFloat16>();
  at::BFloat16* xd = xl.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < x.numel(); i += 64)
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h)
        for (int c = 0; c < 8; ++c) xd[i + 32 * h + 8 * j + c] = xs[i + 16 * j + 8 * h + c];
  return xl;
}

// y[m, o0 + r] for R outputs (one 128-row scale block) and M rows of laid-out x (xp: (M, K) in
// widen_e4m3's order); ldy: y's row stride.
template <int M, int R>
inline void fp8_outputs(const uint8_t* q, int64_t K, const float* s, const at::BFloat16* xp, float* y, int64_t ldy,
                        const E4M3Tables& t) {
  __m512 tot[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    __m512 a[R][M][2];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) a[r][m][0] = a[r][m][1] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(K, k0 + 128); k += 64) {
      for (int r = 0; r < R; ++r) {
        __m512bh w0, w1;
        _mm_prefetch(reinterpret_cast<const char*>(q + (2 * R + r) * K + k), _MM_HINT_T0);  // two passes ahead
        widen_e4m3(q + r * K + k, t, w0, w1);
        for (int m = 0; m < M; ++m) {
          a[r][m][0] = _mm512_dpbf16_ps(a[r][m][0], w0, (__m512bh)_mm512_loadu_si512(xp + m * K + k));
          a[r][m][1] = _mm512_dpbf16_ps(a[r][m][1], w1, (__m512bh)_mm512_loadu_si512(xp + m * K + k + 32));
        }
      }
    }
    const __m512 sc = _mm512_set1_ps(s[k0 / 128]);
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) tot[r][m] = _mm512_fmadd_ps(_mm512_add_ps(a[r][m][0], a[r][m][1]), sc, tot[r][m]);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * ldy + r] = _mm512_reduce_add_ps(tot[r][m]);
}

// One output for one row of laid-out x: the weight row read front to back alone, four independent sums
// (each 128-block's two 64-weight chunks, two halves each), the line 4 KB ahead prefetched. For one row
// of x it streams 1.3-2x faster than fp8_outputs' R rows at a time for K up to 7168 (K = 1536: 29
// against 17 GB/s, the machine's 32 for a plain sum; measured, 2 threads); at K = 16384 it falls behind
// (18.5 against 20.8), where fp8_outputs keeps the row.
constexpr int64_t FP8_ROW_MAX_K = 8192;

inline float fp8_row(const uint8_t* q, int64_t K, const float* s, const at::BFloat16* xp, const E4M3Tables& t) {
  __m512 tot = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(q + 4096 + k0), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + 4096 + k0 + 64), _MM_HINT_T0);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m512bh w0, w1;
    widen_e4m3(q + k0, t, w0, w1);
    a0 = _mm512_dpbf16_ps(a0, w0, (__m512bh)_mm512_loadu_si512(xp + k0));
    a1 = _mm512_dpbf16_ps(a1, w1, (__m512bh)_mm512_loadu_si512(xp + k0 + 32));
    if (k0 + 64 < K) {  // K is a multiple of 64: a last block may hold one chunk
      widen_e4m3(q + k0 + 64, t, w0, w1);
      a2 = _mm512_dpbf16_ps(a2, w0, (__m512bh)_mm512_loadu_si512(xp + k0 + 64));
      a3 = _mm512_dpbf16_ps(a3, w1, (__m512bh)_mm512_loadu_si512(xp + k0 + 96));
    }
    tot = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), _mm512_set1_ps(s[k0 / 128]), tot);
  }
  return _mm512_reduce_add_ps(tot);
}

template <int M>
void fp8_rows(const uint8_t* q, const float* s, const at::BFloat16* xp, float* y, int64_t O, int64_t K) {
  constexpr int R = M == 1 ? 4 : M == 2 ? 2 : 1;  // outputs per pass: enough independent sums in flight
  const E4M3Tables& tables = e4m3_tables();
  const int64_t KB = (K + 127) / 128;
  if (M == 1 && K <= FP8_ROW_MAX_K) {
    at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) y[o] = fp8_row(q + o * K, K, s + (o / 128) * KB, xp, tables);
    });
    return;
  }
  at::parallel_for(0, (O + R - 1) / R, 16, [&](int64_t b, int64_t e) {
    for (int64_t o = b * R; o < std::min(O, e * R); o += R) {
      const float* so = s + (o / 128) * KB;  // R divides 128: a pass stays in one block row
      if (o + R <= O)
        fp8_outputs<M, R>(q + o * K, K, so, xp, y + o, O, tables);
      else
        for (int64_t r = o; r < O; ++r) fp8_outputs<M, 1>(q + r * K, K, so, xp, y + r, O, tables);
    }
  });
}
#endif

constexpr int64_t FP8_MAX_ROWS = 8;

torch::Tensor fp8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s) {
  check_bf16(x, "fp8_linear x");
  TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn && q.dim() == 2 && q.is_contiguous() && q.device().is_cpu(),
              "fp8_linear: q (O, K) float8_e4m3fn, contiguous, on the CPU");
  check_f32(s, "fp8_linear s");
  const int64_t M = x.size(0), K = x.size(1), O = q.size(0);
  TORCH_CHECK(x.dim() == 2 && q.size(1) == K && K % 64 == 0 && 1 <= M && M <= FP8_MAX_ROWS,
              "fp8_linear: x (M, K) with M <= ", FP8_MAX_ROWS, " and q (O, K), K a multiple of 64");
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous() && s.size(0) == (O + 127) / 128 && s.size(1) == (K + 127) / 128,
              "fp8_linear: s (ceil(O/128), ceil(K/128)) contiguous, got ", s.sizes());
  auto y = torch::empty({M, O}, x.options().dtype(at::kFloat));
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  const auto xl = fp8_layout(x);
  const at::BFloat16* xd = xl.data_ptr<at::BFloat16>();
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 1: fp8_rows<1>(qp, sp, xd, yp, O, K); break;
    case 2: fp8_rows<2>(qp, sp, xd, yp, O, K); break;
    case 3: fp8_rows<3>(qp, sp, xd, yp, O, K); break;
    case 4: fp8_rows<4>(qp, sp, xd, yp, O, K); break;
    case 5: fp8_rows<5>(qp, sp, xd, yp, O, K); break;
    case 6: fp8_rows<6>(qp, sp, xd, yp, O, K); break;
    case 7: fp8_rows<7>(qp, sp, xd, yp, O, K); break;
    default: fp8_rows<8>(qp, sp, xd, yp, O, K); break;
  }
#else
  TORCH_CHECK(false, "fp8_linear: built without AVX512-BF16 and AVX512-VBMI (has_fp8_dot() is false)");
#endif
  return y.to(at::kBFloat16);
}

// fp8_fold: MLA's one-token weight folds with kv_b_proj held in FP8 (kernels/attention.py absorb_query,
// absorb_value): y[g] (O) = rows [r0, r0 + O) of group g's weight q[g] (P, K) times x[g] (K), for G groups
// (heads), each with its own x. q (G, P, K) E4M3 contiguous, s (G, P/128, K/128) their 128×128 blocks'
// scales (P, r0 multiples of 128: every block within one head, as kv_b_proj's are at DeepSeek's widths),
// x (G, K) bf16 → y (G, O) bf16. The value fold passes kv_b_proj's weight by head (H, N+V, C) and r0 = N;
// the query fold a transposed copy of the key half, (H, C, N), whose blocks are kv_b's transposed (the
// same scales, exact). fp8_linear's one-row kernel, a row of x per head: half the bytes of the bf16 folds.
torch::Tensor fp8_fold(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& s, int64_t r0, int64_t O) {
  check_bf16(x, "fp8_fold x");
  TORCH_CHECK(q.scalar_type() == at::kFloat8_e4m3fn && q.dim() == 3 && q.is_contiguous() && q.device().is_cpu(),
              "fp8_fold: q (G, P, K) float8_e4m3fn, contiguous, on the CPU");
  check_f32(s, "fp8_fold s");
  const int64_t G = q.size(0), P = q.size(1), K = q.size(2);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == G && x.size(1) == K && K % 64 == 0 && P % 128 == 0 && r0 % 128 == 0 &&
                  0 <= r0 && 1 <= O && r0 + O <= P,
              "fp8_fold: x (G, K) and q (G, P, K) with K a multiple of 64, P and r0 multiples of 128, r0 + O <= P");
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous() && s.size(0) == G && s.size(1) == P / 128 && s.size(2) == (K + 127) / 128,
              "fp8_fold: s (G, P/128, ceil(K/128)) contiguous, got ", s.sizes());
  auto y = torch::empty({G, O}, x.options().dtype(at::kFloat));
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  const auto xl = fp8_layout(x);  // each head's row in widen_e4m3's order
  const at::BFloat16* xd = xl.data_ptr<at::BFloat16>();
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const E4M3Tables& tables = e4m3_tables();
  const int64_t KB = (K + 127) / 128, PB = P / 128;
  at::parallel_for(0, G * O, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t g = i / O, r = r0 + i % O;
      yp[i] = fp8_row(qp + (g * P + r) * K, K, sp + (g * PB + r / 128) * KB, xd + g * K, tables);
    }
  });
#else
  TORCH_CHECK(false, "fp8_fold: built without AVX512-BF16 and AVX512-VBMI (has_fp8_dot() is false)");
#endif
  return y.to(at::kBFloat16);
}

// top_k: the indices (R, K) of the K largest of each row of s (R, S) fp32, in increasing order, ties at
// the K-th largest value going to the earliest (model/dsa.py's selection; kernels/attention.py top_k,
// whose torch path is the reference). The K-th largest is found by radix: each score as an unsigned key
// that orders as the floats do, a histogram of the keys' top 11 bits finds the bin that holds it, and
// only that bin's scores are then ordered (nth_element); one last pass takes what is above it and the
// first of what equals it. Branch-free passes (a data-dependent branch per score mispredicts at random:
// nth_element over a whole fresh 32K row took 0.29 ms). Rows split over threads.
inline uint32_t order_key(float x) {  // unsigned keys ordered as the floats (x + 0: -0 and +0 one key)
  x += 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u & 0x80000000u ? ~u : u | 0x80000000u;
}

torch::Tensor top_k(const torch::Tensor& s, int64_t K) {
  check_f32(s, "top_k s");
  TORCH_CHECK(s.dim() == 2 && s.is_contiguous() && 0 < K && K <= s.size(1), "top_k: s (R, S) contiguous, 0 < K <= S");
  const int64_t R = s.size(0), S = s.size(1);
  auto out = torch::empty({R, K}, s.options().dtype(at::kLong));
  const float* sp = s.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  constexpr int BITS = 11, BINS = 1 << BITS;
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    std::vector<float> cand(S);
    std::vector<int64_t> hist(BINS);
    for (int64_t r = b; r < e; ++r) {
      const float* row = sp + r * S;
      std::fill(hist.begin(), hist.end(), 0);
      for (int64_t i = 0; i < S; ++i) ++hist[order_key(row[i]) >> (32 - BITS)];
      int64_t bin = BINS - 1, above = 0;  // the bin of the K-th largest, and how many lie in bins above it
      while (above + hist[bin] < K) above += hist[bin--];
      int64_t n = 0;
      for (int64_t i = 0; i < S; ++i) {
        cand[n] = row[i];
        n += (order_key(row[i]) >> (32 - BITS)) == uint32_t(bin);
      }
      std::nth_element(cand.begin(), cand.begin() + (K - above - 1), cand.begin() + n, std::greater<float>());
      const float kth = cand[K - above - 1];
      for (int64_t i = 0; i < n; ++i) above += cand[i] > kth;
      int64_t room = K - above, m = 0;
      int64_t* o = op + r * K;
      for (int64_t i = 0; i < S && m < K; ++i) {
        const bool tie = row[i] == kth, take = row[i] > kth || (tie && room > 0);
        room -= tie & take;
        o[m] = i;
        m += take;
      }
    }
  });
  return out;
}

// select_rows: out[i] = x[idx[i]] for rows x (N, F) of any dtype, idx (M,) int64, into out (M, F)
// (rows contiguous, any row stride for both: DSA gathers c_kv and k_pe side by side into one buffer of
// [c_kv ‖ k_pe] rows), what index_select(0, idx) returns. DSA gathers each query's 2048
// selected latents from a cache far larger than the caches: a row's first line misses, and
// index_select's row-by-row copy waits for each miss in turn (1.1 ms for 2048 rows of 1 KB from a
// 32K-token pool). Here each row's lines are prefetched PREFETCH_ROWS rows ahead.
constexpr int64_t PREFETCH_ROWS = 8;

torch::Tensor select_rows(const torch::Tensor& x, const torch::Tensor& idx, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), "select_rows: x (N, F) rows contiguous, CPU");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous() && idx.device().is_cpu(),
              "select_rows: idx (M,) int64 contiguous, CPU");
  const int64_t N = x.size(0), F = x.size(1), M = idx.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == F && out.stride(1) == 1 &&
                  out.scalar_type() == x.scalar_type() && out.device().is_cpu(),
              "select_rows: out (M, F) rows contiguous, x's dtype");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(0 <= ip[i] && ip[i] < N, "select_rows: index ", ip[i], " out of range for ", N, " rows");
  const int64_t esz = x.element_size(), row = F * esz, ld = x.stride(0) * esz, ldo = out.stride(0) * esz;
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < std::min(e, b + PREFETCH_ROWS); ++i)  // the chunk's first rows
      for (int64_t o = 0; o < row; o += 64) __builtin_prefetch(xp + ip[i] * ld + o);
    for (int64_t i = b; i < e; ++i) {
      if (i + PREFETCH_ROWS < e) {
        const char* next = xp + ip[i + PREFETCH_ROWS] * ld;
        for (int64_t o = 0; o < row; o += 64) __builtin_prefetch(next + o);
      }
      std::memcpy(op + i * ldo, xp + ip[i] * ld, row);
    }
  });
  return out;
}

// ---- block-wise FP8 quantization: quant/fp8.py's quantize and dequantize on the CPU, equal bit for bit to
// their torch path (tests/test_fp8.py). x (B, R, C) → E4M3 bytes and one fp32 scale per (br, bc) block,
// edge blocks partial; the scale is amax / 448 (pow2: rounded up to a power of two). One block row (br
// rows) is read twice, for its columns' maxima and then to quantize, so 128 rows stay in L2 between the
// passes; torch's path takes a dozen passes over the tensor. A non-finite value makes its block row's
// scales NaN, which the caller turns into an error naming where it is.
namespace {

// v (finite) → the byte of its nearest E4M3 value, ties to even, |v| first clamped to 448. All on the bits,
// with a mask rather than a branch for the subnormals: a branch (or a float clamp, which gcc turns into
// branches) leaves the float add below in a branch that "could trap", and the loop would not vectorize.
inline uint8_t e4m3_quantize(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t sign = (u >> 24) & 0x80u, b = std::min(u & 0x7FFFFFFFu, 0x43E00000u);  // |v| ≤ 448
  float a;
  std::memcpy(&a, &b, 4);
  const uint32_t r = (b + 0x7FFFFu + ((b >> 20) & 1u)) & 0xFFF00000u;  // 3 mantissa bits kept, to nearest even
  const uint32_t normal = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
  // below 2^-6: multiples of 2^-9 (fp32's ulp at 2^14); float → int32 vectorizes on AVX2, → uint32 not
  const uint32_t sub = uint32_t(int32_t(((a + 16384.0f) - 16384.0f) * 512.0f));
  const uint32_t m = 0u - uint32_t(b < 0x3C800000u);  // |v| < 2^-6
  return uint8_t((sub & m) | (normal & ~m) | sign);
}

inline uint32_t abs_bits(float x) {  // |x|'s bits: ordered as the values, NaN and inf from 0x7F800000 up
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u & 0x7FFFFFFFu;
}

// One block row: x (rows, C) → q (rows, C) and s (⌈C/bc⌉,). The maxima are taken on |x|'s bits, which
// order as the values do (integer max vectorizes; a float max, NaN-aware, would not).
template <typename T>
void quantize_block_row(const T* x, int64_t rows, int64_t C, int64_t bc, bool pow2, float* s, uint8_t* q,
                        std::vector<uint32_t>& amax, std::vector<float>& scale) {
  std::fill(amax.begin(), amax.end(), 0u);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) amax[c] = std::max(amax[c], abs_bits(float(x[r * C + c])));
  bool bad = false;
  for (int64_t j = 0; j * bc < C; ++j) {
    const int64_t c1 = std::min(C, (j + 1) * bc);
    uint32_t m = 0;
    for (int64_t c = j * bc; c < c1; ++c) m = std::max(m, amax[c]);
    bad |= m >= 0x7F800000u;
    float sc;
    std::memcpy(&sc, &m, 4);
    sc = std::max(sc, 1e-12f) / 448.0f;
    if (pow2) {
      int e;
      const float f = std::frexp(sc, &e);
      sc = std::ldexp(1.0f, f == 0.5f ? e - 1 : e);
    }
    s[j] = sc;
    for (int64_t c = j * bc; c < c1; ++c) scale[c] = sc;
  }
  if (bad) {  // the caller finds where
    for (int64_t j = 0; j * bc < C; ++j) s[j] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) q[r * C + c] = e4m3_quantize(float(x[r * C + c]) / scale[c]);
}

}  // namespace

std::vector<torch::Tensor> fp8_quantize(const torch::Tensor& x, int64_t br, int64_t bc, bool pow2) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 2 && br > 0 && bc > 0 &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fp8_quantize: x (..., R, C) contiguous fp32 or bf16 on the CPU, blocks br, bc > 0");
  const int64_t C = x.size(-1), R = x.size(-2), B = R * C ? x.numel() / (R * C) : 0;
  const int64_t nr = (R + br - 1) / br, nc = (C + bc - 1) / bc;
  auto q = torch::empty(x.sizes(), x.options().dtype(at::kByte));
  auto sizes = x.sizes().vec();
  sizes[sizes.size() - 2] = nr, sizes[sizes.size() - 1] = nc;
  auto s = torch::empty(sizes, x.options().dtype(at::kFloat));
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = s.data_ptr<float>();
  auto run = [&](auto* xp) {
    at::parallel_for(0, B * nr, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, br * C)), [&](int64_t i0, int64_t i1) {
      std::vector<uint32_t> amax(C);
      std::vector<float> scale(C);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nr, r0 = (i % nr) * br, off = (b * R + r0) * C;
        quantize_block_row(xp + off, std::min(br, R - r0), C, bc, pow2, sp + i * nc, qp + off, amax, scale);
      }
    });
  };
  if (x.scalar_type() == at::kFloat) run(x.data_ptr<float>());
  else run(x.data_ptr<at::BFloat16>());
  return {q, s};
}

// q (B, R, C) E4M3 bytes times s (B, ⌈R/br⌉, ⌈C/bc⌉) → fp32 or bf16: each byte's exact value times its
// block's scale, one fp32 rounding as in the torch path.
torch::Tensor fp8_dequantize(const torch::Tensor& q, const torch::Tensor& s, int64_t br, int64_t bc, bool bf16) {
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && q.scalar_type() == at::kByte && q.dim() >= 2 &&
              s.is_contiguous() && s.scalar_type() == at::kFloat && br > 0 && bc > 0,
              "fp8_dequantize: q uint8 (..., R, C) and s fp32, contiguous, on the CPU");
  const int64_t C = q.size(-1), R = q.size(-2), B = R * C ? q.numel() / (R * C) : 0;
  const int64_t nr = (R + br - 1) / br, nc = (C + bc - 1) / bc;
  TORCH_CHECK(s.numel() == B * nr * nc, "fp8_dequantize: s holds ", s.numel(), " scales, expected ", B * nr * nc);
  auto out = torch::empty(q.sizes(), q.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  auto run = [&](auto* op) {
    using out_t = std::remove_pointer_t<decltype(op)>;
    at::parallel_for(0, B * R, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t i0, int64_t i1) {
      std::vector<float> sc(C);
      const float* filled = nullptr;  // the block row whose scales sc holds: br rows share one
      for (int64_t i = i0; i < i1; ++i) {
        const float* srow = sp + ((i / R) * nr + (i % R) / br) * nc;
        if (srow != filled) {
          for (int64_t j = 0; j < nc; ++j) std::fill(sc.begin() + j * bc, sc.begin() + std::min(C, (j + 1) * bc), srow[j]);
          filled = srow;
        }
        for (int64_t c = 0; c < C; ++c) op[i * C + c] = out_t(e4m3_value(qp[i * C + c]) * sc[c]);
      }
    });
  };
  if (bf16) run(out.data_ptr<at::BFloat16>());
  else run(out.data_ptr<float>());
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sigmoid_gate", &sigmoid_gate, "DeepSeek-V3's noaux_tc sigmoid router for a few fp32 tokens");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few fp32 rows");
  m.def("moe_tokens", &moe_tokens, "the routed experts' weighted output for a few tokens");
  m.def("linear_t", &linear_t, "y = x @ wt (+ bias) for decode's few rows, wt (K, O) contiguous");
  m.def("absorb_query", &absorb_query, "q_nope (H, N) through kv_b's key half of w (H, N+V, C) -> (H, C)");
  m.def("absorb_value", &absorb_value, "o_lat (H, C) through kv_b's value half of w (H, N+V, C) -> (H, V), fp32 or bf16");
  m.def("has_bf16_dot", &has_bf16_dot, "whether the bf16 kernels were built (AVX512-BF16: index_scores, absorb_value)");
  m.def("index_scores", &index_scores, "the lightning indexer's scores for q (T, J, E), keys (S, E): bf16 or fp32");
  m.def("has_fp8_dot", &has_fp8_dot, "whether fp8_linear was built (AVX512-BF16 and AVX512-VBMI)");
  m.def("fp8_linear", &fp8_linear, "y = x @ (q * s).T for a few bf16 rows, q (O, K) E4M3 with 128x128 block scales s");
  m.def("fp8_fold", &fp8_fold, "y[g] = rows [r0, r0+O) of (q[g] * s[g]) @ x[g] for each head g: MLA's folds with kv_b in E4M3");
  m.def("fp8_quantize", &fp8_quantize, "x (..., R, C) -> E4M3 bytes and one fp32 scale per (br, bc) block (NaN: non-finite)");
  m.def("fp8_dequantize", &fp8_dequantize, "E4M3 bytes (..., R, C) times their (br, bc) block scales -> fp32 or bf16");
  m.def("top_k", &top_k, "the indices of each row's K largest fp32 scores, in order, ties to the earliest");
  m.def("select_rows", &select_rows, "out[i] = x[idx[i]]: rows gathered with the next ones prefetched");
  m.def("latent_attention", &latent_attention, "absorbed MLA attention of Q queries over S cached latents");
}

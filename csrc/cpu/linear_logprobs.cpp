// Fused linear log-probs on the CPU: per-token log p(target) straight from hidden states and the LM head,
// without materialising the N x V logits.
//
// The vocabulary is walked in chunks of `chunk` rows of the weight. Per chunk one ATen matrix product (input
// dtype; MKL / oneDNN, AVX-512 bf16 where the CPU has it) gives the N x chunk logits, and one pass over them in
// fp32 (fp64 for fp64 input) keeps a running max `m` and running sum `S` of exp(z - m) per row (online
// log-sum-exp). When the head is frozen and hidden needs a gradient (`need_grad`), the same pass turns the
// chunk into p~_v * f'(a_v) (p~ relative to the running max) in place, and a second product accumulates
// E += P~ @ W_chunk; rows of E are rescaled by exp(m_old - m_new) when their reference max moves (the
// flash-attention trick, done lazily: only when a chunk's max exceeds the reference by more than 8). At the end J = s * (f'_t w_t - E / S) = d logp / d hidden, so the backward is a per-row scale.
// Peak extra memory: one N x chunk buffer plus N x d for E / J, never N x V.
// The math and the C++ contract (shared with the CUDA build) are in docs/kernels.md.
#include "linear_logprobs.h"

#include "../common.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace tpo_lite {
namespace {

// exp for float that the compiler can vectorise (glibc expf is a scalar call and would dominate the
// elementwise pass). exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2], exp(r) by its degree-7 Taylor
// polynomial (truncation < 6e-9 relative, i.e. within ~1 ulp of float). Inputs below -87.3 (where the
// result would be denormal) give exactly 0, which is what the log-sum-exp wants for far-off logits.
inline __attribute__((always_inline)) float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float kf = std::floor(xc * 1.44269504088896341f + 0.5f);
  // ln2 split in two so r = x - k ln2 keeps full precision (Cody-Waite).
  const float r = (xc - kf * 0.693145751953125f) - kf * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}
inline __attribute__((always_inline)) double fast_exp(double x) { return std::exp(x); }

// tanh from the exp above: tanh(|x|) = (1 - e^{-2|x|}) / (1 + e^{-2|x|}); never overflows. Absolute error is
// ~1e-7 (relative error grows only for |x| << 1, where z = c * tanh is tiny anyway).
inline __attribute__((always_inline)) float fast_tanh(float x) {
  const float e = fast_exp(-2.0f * std::fabs(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}
inline __attribute__((always_inline)) double fast_tanh(double x) { return std::tanh(x); }

// The CPU's exp / tanh for the shared helpers of common.h.
struct CpuMath {
  template <typename T>
  static inline __attribute__((always_inline)) T exp(T x) { return fast_exp(x); }
  template <typename T>
  static inline __attribute__((always_inline)) T tanh(T x) { return fast_tanh(x); }
};

template <typename acc_t>
using Cap = Softcap<acc_t, CpuMath>;

// Forward pass over one vocab chunk for rows [begin, end). `buf` holds the chunk logits (row stride `c`,
// dtype scalar_t); it is overwritten with p~ * f' when need_grad. State per row: running max m, running sum
// S, target logit zt and its f'_t; rows of E (n x d) are rescaled here when their reference max moves.
template <typename scalar_t, typename acc_t, bool kCap>
inline __attribute__((always_inline)) void fwd_rows_impl(scalar_t* buf, int64_t c, int64_t v0, int64_t begin,
                                                        int64_t end, const int64_t* tgt, acc_t* m, acc_t* S,
                                                        acc_t* zt, acc_t* fpt, acc_t* E, int64_t d, acc_t lazy,
                                                        bool need_grad, const Cap<acc_t>& f) {
  std::vector<acc_t> z(c);
  acc_t* zp = z.data();
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* row = buf + i * c;
    // Lazy rescaling: a row's reference max m only moves when a chunk's max exceeds it by more than `lazy`
    // (so p~ <= e^lazy). Then the common case is ONE pass over the chunk, optimistically relative to the
    // current m; only when the chunk overshoots (first chunk, or a new max > m + lazy: a few times per row)
    // is the row redone relative to the new max from the fp32 copy in `z`, and its E row rescaled.
    const acc_t m_old = m[i];
    acc_t mx = kNegInf, sum = 0;
    if (m_old == kNegInf) {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < c; ++j) {
        const acc_t v = f.template z<kCap>(static_cast<acc_t>(row[j]));
        zp[j] = v;
        mx = std::max(mx, v);
      }
    } else if (need_grad) {
#pragma omp simd reduction(max : mx) reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) {
        const acc_t v = f.template z<kCap>(static_cast<acc_t>(row[j]));
        zp[j] = v;
        mx = std::max(mx, v);
        const acc_t p = fast_exp(v - m_old);  // clamped inside fast_exp: finite even when it overshoots
        sum += p;
        row[j] = static_cast<scalar_t>(p * f.template dz<kCap>(v));
      }
    } else {
#pragma omp simd reduction(max : mx) reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) {
        const acc_t v = f.template z<kCap>(static_cast<acc_t>(row[j]));
        zp[j] = v;
        mx = std::max(mx, v);
        sum += fast_exp(v - m_old);
      }
    }
    const int64_t t = tgt[i] - v0;
    if (t >= 0 && t < c) {
      zt[i] = zp[t];
      fpt[i] = f.template dz<kCap>(zp[t]);
    }
    if (!(mx > m_old + lazy)) {  // the optimistic pass stands
      S[i] += sum;
      continue;
    }
    const acc_t m_new = mx;
    sum = 0;
    if (need_grad) {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) {
        const acc_t p = fast_exp(zp[j] - m_new);
        sum += p;
        row[j] = static_cast<scalar_t>(p * f.template dz<kCap>(zp[j]));
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < c; ++j) sum += fast_exp(zp[j] - m_new);
    }
    // first chunk: a = 0, nothing accumulated yet
    const acc_t a = lse_merge<CpuMath>(m[i], S[i], m_new, sum);
    if (need_grad) {  // a may underflow to 0 for a jump > 87: then the old E must be zeroed too
      acc_t* Er = E + i * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) Er[k] *= a;
    }
  }
}

// Backward (recompute) over one vocab chunk: buf (logits) becomes
// G = g * s * f' * (onehot(t) - p), p = exp(z - lse).
template <typename scalar_t, typename acc_t, bool kCap>
inline __attribute__((always_inline)) void bwd_rows_impl(scalar_t* buf, int64_t c, int64_t v0, int64_t begin,
                                                        int64_t end, const int64_t* tgt, const acc_t* lse,
                                                        const acc_t* g, const Cap<acc_t>& f) {
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* row = buf + i * c;
    const acc_t l = lse[i];
    const acc_t gs = g[i] * f.scale;
    const int64_t t = tgt[i] - v0;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const acc_t z = f.template z<kCap>(static_cast<acc_t>(row[j]));
      const acc_t p = fast_exp(z - l);
      const acc_t onehot = j == t ? acc_t(1) : acc_t(0);
      row[j] = static_cast<scalar_t>(gs * f.template dz<kCap>(z) * (onehot - p));
    }
  }
}

// One compiled copy per ISA level, picked at load time, so the extension runs on any x86-64 and still uses
// AVX-512 where present (the build itself has no -march flag).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TPO_CLONES
#endif

#define TPO_DEFINE_ROWS(NAME, scalar_t, acc_t)                                                                  \
  TPO_CLONES void fwd_rows_##NAME(scalar_t* buf, int64_t c, int64_t v0, int64_t b, int64_t e, const int64_t* tgt, \
                                  acc_t* m, acc_t* S, acc_t* zt, acc_t* fpt, acc_t* E, int64_t d, acc_t lazy,    \
                                  bool need_grad, const Cap<acc_t>& f) {                                         \
    if (f.cap > 0)                                                                                               \
      fwd_rows_impl<scalar_t, acc_t, true>(buf, c, v0, b, e, tgt, m, S, zt, fpt, E, d, lazy, need_grad, f);      \
    else                                                                                                         \
      fwd_rows_impl<scalar_t, acc_t, false>(buf, c, v0, b, e, tgt, m, S, zt, fpt, E, d, lazy, need_grad, f);     \
  }                                                                                                              \
  TPO_CLONES void bwd_rows_##NAME(scalar_t* buf, int64_t c, int64_t v0, int64_t b, int64_t e, const int64_t* tgt, \
                                  const acc_t* lse, const acc_t* g, const Cap<acc_t>& f) {                       \
    if (f.cap > 0)                                                                                               \
      bwd_rows_impl<scalar_t, acc_t, true>(buf, c, v0, b, e, tgt, lse, g, f);                                    \
    else                                                                                                         \
      bwd_rows_impl<scalar_t, acc_t, false>(buf, c, v0, b, e, tgt, lse, g, f);                                   \
  }

TPO_DEFINE_ROWS(f64, double, double)
TPO_DEFINE_ROWS(f32, float, float)
TPO_DEFINE_ROWS(bf16, c10::BFloat16, float)
TPO_DEFINE_ROWS(f16, c10::Half, float)

inline void fwd_rows(double* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, double* m,
                     double* S, double* zt, double* fpt, double* E, int64_t d, double lz, bool ng, const Cap<double>& f) {
  fwd_rows_f64(b, c, v0, s, e, t, m, S, zt, fpt, E, d, lz, ng, f);
}
inline void fwd_rows(float* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, float* m,
                     float* S, float* zt, float* fpt, float* E, int64_t d, float lz, bool ng, const Cap<float>& f) {
  fwd_rows_f32(b, c, v0, s, e, t, m, S, zt, fpt, E, d, lz, ng, f);
}
inline void fwd_rows(c10::BFloat16* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, float* m,
                     float* S, float* zt, float* fpt, float* E, int64_t d, float lz, bool ng, const Cap<float>& f) {
  fwd_rows_bf16(b, c, v0, s, e, t, m, S, zt, fpt, E, d, lz, ng, f);
}
inline void fwd_rows(c10::Half* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, float* m,
                     float* S, float* zt, float* fpt, float* E, int64_t d, float lz, bool ng, const Cap<float>& f) {
  fwd_rows_f16(b, c, v0, s, e, t, m, S, zt, fpt, E, d, lz, ng, f);
}
inline void bwd_rows(double* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, const double* l,
                     const double* g, const Cap<double>& f) {
  bwd_rows_f64(b, c, v0, s, e, t, l, g, f);
}
inline void bwd_rows(float* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, const float* l,
                     const float* g, const Cap<float>& f) {
  bwd_rows_f32(b, c, v0, s, e, t, l, g, f);
}
inline void bwd_rows(c10::BFloat16* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t,
                     const float* l, const float* g, const Cap<float>& f) {
  bwd_rows_bf16(b, c, v0, s, e, t, l, g, f);
}
inline void bwd_rows(c10::Half* b, int64_t c, int64_t v0, int64_t s, int64_t e, const int64_t* t, const float* l,
                     const float* g, const Cap<float>& f) {
  bwd_rows_f16(b, c, v0, s, e, t, l, g, f);
}

// Default chunk: an N x chunk logits buffer of about 32 MiB, clamped to [1024, 8192] vocab rows. Few chunks
// mean few synchronisation points (product / parallel pass / product) and few read-modify-writes of E; on
// one thread the chunk size barely mattered (512..8192 within noise), on two contended threads fewer,
// larger chunks won. Memory stays far below the N x V logits. (Measurements: docs/kernels.md.)
int64_t pick_chunk(int64_t chunk, int64_t n_rows, int64_t V, int64_t elem_size) {
  if (chunk > 0) return std::min(chunk, V);
  const int64_t target_bytes = int64_t(32) << 20;
  int64_t c = target_bytes / std::max<int64_t>(1, n_rows * elem_size);
  c = std::max<int64_t>(1024, std::min<int64_t>(c, 8192));
  c = (c + 63) / 64 * 64;
  return std::min(c, V);
}

// The start of both entry points: the CPU's own checks, the shared ones (shapes, dtypes, chunk; the backward's
// grad_logp and lse when given: common.h), then the inputs, the kept rows and the chunk.
Inputs checked_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                      int64_t ignore_index, int64_t chunk, const char* fn, const at::Tensor& grad_logp = {},
                      const at::Tensor& lse = {}) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(), fn,
              ": hidden, weight and targets must all be CPU tensors, got ", hidden.device(), ", ", weight.device(),
              ", ", targets.device());
  check_inputs(hidden, weight, targets, chunk, fn);
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && targets.is_contiguous(), fn,
              ": hidden, weight and targets must be contiguous (call .contiguous())");
  if (grad_logp.defined()) check_backward_inputs(grad_logp, lse, hidden, fn);
  Inputs in = prepare_inputs(hidden, weight, targets, ignore_index, fn);
  in.chunk = pick_chunk(chunk, in.rows.n, in.V, hidden.element_size());
  return in;
}

// The vocabulary in chunks of C weight rows: body(v0, c, W_chunk, L) with L = hidden @ W_chunk^T [n, c] in the
// input dtype, one buffer for every chunk.
template <typename Body>
void for_each_chunk(const at::Tensor& hidden, const at::Tensor& weight, int64_t C, const Body& body) {
  const int64_t n = hidden.size(0), V = weight.size(0);
  at::Tensor flat = at::empty({n * C}, hidden.options());
  for (int64_t v0 = 0; v0 < V; v0 += C) {
    const int64_t c = std::min(C, V - v0);
    const at::Tensor W = weight.narrow(0, v0, c);
    at::Tensor L = flat.narrow(0, 0, n * c).view({n, c});
    at::mm_out(L, hidden, W.t());
    body(v0, c, W, L);
  }
}

// Rows per task of the parallel passes over a chunk: the work per row is ~C exps, so a grain of a few rows
// keeps the parallel overhead negligible.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)); }

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> forward_impl(const Inputs& in, double logit_scale, double softcap, bool need_grad) {
  const int64_t N = in.N, d = in.d, n = in.rows.n;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_opts = in.hidden.options().dtype(acc_dtype);
  if (n == 0) {  // every target ignored: zeros, nothing to compute
    return {at::zeros({N}, acc_opts), at::zeros({N}, acc_opts),
            need_grad ? at::zeros({N, d}, acc_opts) : at::empty({0}, acc_opts)};
  }
  const at::Tensor hidden = in.rows.select(in.hidden), targets = in.rows.select(in.targets);

  const Cap<acc_t> f = Cap<acc_t>::make(logit_scale, softcap);
  at::Tensor m = at::full({n}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor S = at::zeros({n}, acc_opts);
  at::Tensor zt = at::zeros({n}, acc_opts);
  at::Tensor fpt = at::zeros({n}, acc_opts);
  // E accumulates sum_v p~_v f'_v w_v in the accumulation dtype
  at::Tensor E = need_grad ? at::zeros({n, d}, acc_opts) : at::Tensor();
  acc_t* Ep = need_grad ? E.template data_ptr<acc_t>() : nullptr;
  // p~ may reach e^lazy (lazy rescaling above); fp16 products could overflow at 65504, so fp16 rescales
  // exactly (p~ <= 1) instead.
  const acc_t lazy = std::is_same<scalar_t, c10::Half>::value ? acc_t(0) : acc_t(8);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  acc_t* mp = m.template data_ptr<acc_t>();
  acc_t* Sp = S.template data_ptr<acc_t>();
  acc_t* ztp = zt.template data_ptr<acc_t>();
  acc_t* fpp = fpt.template data_ptr<acc_t>();

  for_each_chunk(hidden, in.weight, in.chunk, [&](int64_t v0, int64_t c, const at::Tensor& W, const at::Tensor& L) {
    scalar_t* Lp = L.template data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(in.chunk), [&](int64_t b, int64_t e) {
      fwd_rows(Lp, c, v0, b, e, tgt, mp, Sp, ztp, fpp, Ep, d, lazy, need_grad, f);
    });
    if (need_grad) {
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        E.addmm_(L, W);
      } else {
        E.add_(at::mm(L, W));  // half-precision product, accumulated in fp32
      }
    }
  });

  auto lse = m + S.log();
  auto logp = zt - lse;
  at::Tensor J = at::empty({0}, acc_opts);
  if (need_grad) {
    // J = s * (f'_t * w_t - E / S)
    auto Wt = in.weight.index_select(0, targets).to(acc_dtype);
    Wt.mul_((fpt * f.scale).unsqueeze(1)).sub_(E.mul_((S.reciprocal() * f.scale).unsqueeze(1)));
    J = in.rows.scatter(Wt, N);
  }
  return {in.rows.scatter(logp, N), in.rows.scatter(lse, N), J};
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_all, const at::Tensor& lse_all, const Inputs& in,
                                      double logit_scale, double softcap, bool need_gh, bool need_gw) {
  const int64_t N = in.N, d = in.d, n = in.rows.n;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = in.hidden.options();  // weight's too: same dtype and device
  at::Tensor gh_all = need_gh ? at::zeros({N, d}, opts) : at::empty({0}, opts);
  at::Tensor gw = need_gw ? at::zeros({in.V, d}, opts) : at::empty({0}, opts);
  if ((!need_gh && !need_gw) || n == 0) return {gh_all, gw};

  const at::Tensor hidden = in.rows.select(in.hidden), targets = in.rows.select(in.targets);
  const at::Tensor lse = in.rows.select(lse_all).to(acc_dtype).contiguous();
  const at::Tensor g = in.rows.select(grad_all).to(acc_dtype).contiguous();

  const Cap<acc_t> f = Cap<acc_t>::make(logit_scale, softcap);
  auto gh = need_gh ? at::zeros({n, d}, opts.dtype(acc_dtype)) : at::Tensor();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const acc_t* lp = lse.template data_ptr<acc_t>();
  const acc_t* gp = g.template data_ptr<acc_t>();

  for_each_chunk(hidden, in.weight, in.chunk, [&](int64_t v0, int64_t c, const at::Tensor& W, const at::Tensor& G) {
    scalar_t* Gp = G.template data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(in.chunk),
                     [&](int64_t b, int64_t e) { bwd_rows(Gp, c, v0, b, e, tgt, lp, gp, f); });
    if (need_gw) {
      auto out = gw.narrow(0, v0, c);  // rows v0.. of a contiguous [V, d]: contiguous
      at::mm_out(out, G.t(), hidden);
    }
    if (need_gh) {
      if constexpr (std::is_same<scalar_t, acc_t>::value) {
        gh.addmm_(G, W);
      } else {
        gh.add_(at::mm(G, W));
      }
    }
  });
  if (need_gh) gh_all = in.rows.scatter(gh.to(in.hidden.scalar_type()), N);
  return {gh_all, gw};
}

}  // namespace

std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& targets, int64_t ignore_index,
                                                double logit_scale, double softcap, int64_t chunk,
                                                bool need_grad) {
  const Inputs in = checked_inputs(hidden, weight, targets, ignore_index, chunk, "linear_logprobs_forward (CPU)");
  at::NoGradGuard no_grad;  // the Python autograd.Function owns differentiation; no graph of the internals
  switch (hidden.scalar_type()) {
    case at::kDouble:
      return forward_impl<double, double>(in, logit_scale, softcap, need_grad);
    case at::kFloat:
      return forward_impl<float, float>(in, logit_scale, softcap, need_grad);
    case at::kBFloat16:
      return forward_impl<c10::BFloat16, float>(in, logit_scale, softcap, need_grad);
    default:
      return forward_impl<c10::Half, float>(in, logit_scale, softcap, need_grad);
  }
}

std::vector<at::Tensor> linear_logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& hidden,
                                                 const at::Tensor& weight, const at::Tensor& targets,
                                                 const at::Tensor& lse, int64_t ignore_index, double logit_scale,
                                                 double softcap, int64_t chunk, bool need_grad_hidden,
                                                 bool need_grad_weight) {
  const Inputs in = checked_inputs(hidden, weight, targets, ignore_index, chunk, "linear_logprobs_backward (CPU)",
                                   grad_logp, lse);
  at::NoGradGuard no_grad;
  switch (hidden.scalar_type()) {
    case at::kDouble:
      return backward_impl<double, double>(grad_logp, lse, in, logit_scale, softcap, need_grad_hidden,
                                           need_grad_weight);
    case at::kFloat:
      return backward_impl<float, float>(grad_logp, lse, in, logit_scale, softcap, need_grad_hidden,
                                         need_grad_weight);
    case at::kBFloat16:
      return backward_impl<c10::BFloat16, float>(grad_logp, lse, in, logit_scale, softcap, need_grad_hidden,
                                                 need_grad_weight);
    default:
      return backward_impl<c10::Half, float>(grad_logp, lse, in, logit_scale, softcap, need_grad_hidden,
                                             need_grad_weight);
  }
}

}  // namespace tpo_lite

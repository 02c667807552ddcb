// What the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels share, after llm.c's common.h: the logit transform
// (logit_scale, softcap), the online log-sum-exp merge, the input checks, the row compaction and the prepared
// inputs of an entry point, each written once. The math part is host/device-neutral (TPO_HOST_DEVICE); each
// backend supplies its own exp / tanh through a `Math` policy (the CPU's vectorisable polynomial, CUDA's
// libdevice). The ATen part runs on the host. Included by relative path ("../common.h"), so no build needs an
// extra include directory.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#ifdef __CUDACC__
#define TPO_HOST_DEVICE __host__ __device__
#define TPO_INLINE __forceinline__
#else
#define TPO_HOST_DEVICE
// always_inline: the CPU row loops are `omp simd` loops, which only vectorise with these calls inlined
#define TPO_INLINE inline __attribute__((always_inline))
#endif

namespace tpo_lite {

// The Python wrapper's default ignore_index (PyTorch's cross_entropy default); the C++ entry points take it as
// an argument.
constexpr int64_t kIgnoreIndex = -100;

// ------------------------------------------------------------------------------------------- device-neutral math

// z = f(s * raw) with f the identity or Gemma's softcap c * tanh(. / c); f'(a) = 1 - tanh^2 = 1 - (z / c)^2.
// `Math::tanh` is the backend's tanh. z<kCap> / dz<kCap> fix the cap at compile time (the CPU's `omp simd`
// loops must carry no tanh when uncapped: a runtime branch there is if-converted, i.e. computed); z / dz
// branch at run time (one uniform branch per CUDA block).
template <typename acc_t, typename Math>
struct Softcap {
  acc_t scale;    // logit_scale s
  acc_t cap;      // softcap c (> 0), or 0 for none
  acc_t inv_cap;  // 1 / c, or 0

  // From the entry points' double arguments (softcap <= 0: none); 1 / c is rounded once, from double.
  static Softcap make(double logit_scale, double softcap) {
    return Softcap{static_cast<acc_t>(logit_scale), softcap > 0 ? static_cast<acc_t>(softcap) : acc_t(0),
                   softcap > 0 ? static_cast<acc_t>(1.0 / softcap) : acc_t(0)};
  }
  TPO_HOST_DEVICE TPO_INLINE bool capped() const { return cap > acc_t(0); }

  template <bool kCap>
  TPO_HOST_DEVICE TPO_INLINE acc_t z(acc_t raw) const {
    const acc_t a = scale * raw;
    if constexpr (kCap) return cap * Math::tanh(a * inv_cap);
    return a;
  }
  template <bool kCap>
  TPO_HOST_DEVICE TPO_INLINE acc_t dz(acc_t z) const {
    if constexpr (kCap) {
      const acc_t t = z * inv_cap;
      return acc_t(1) - t * t;
    }
    return acc_t(1);
  }
  TPO_HOST_DEVICE TPO_INLINE acc_t z(acc_t raw) const { return capped() ? z<true>(raw) : z<false>(raw); }
  TPO_HOST_DEVICE TPO_INLINE acc_t dz(acc_t z) const { return capped() ? dz<true>(z) : dz<false>(z); }
};

// Online log-sum-exp merge (the flash-attention rescale): the running max m and sum S = sum exp(z - m) absorb
// a chunk whose max is m_new >= m and whose sum `chunk_sum` is relative to m_new. Returns the factor
// exp(m - m_new) applied to S, for the caller's other accumulators; on the first chunk m = -inf and the
// factor is exp(-inf) = 0, which wipes the (empty) history.
template <typename Math, typename acc_t>
TPO_HOST_DEVICE TPO_INLINE acc_t lse_merge(acc_t& m, acc_t& S, acc_t m_new, acc_t chunk_sum) {
  const acc_t a = Math::exp(m - m_new);
  S = S * a + chunk_sum;
  m = m_new;
  return a;
}

// ------------------------------------------------------------------------------------------- host: ATen

// Shape, dtype and option checks of both entry points of both backends; `fn` names the entry point in each
// message. Device placement and contiguity are each backend's own (the CPU refuses non-contiguous input,
// CUDA copies it).
inline void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                         int64_t chunk, const char* fn) {
  TORCH_CHECK(hidden.dim() == 2, fn, ": hidden must be 2-D [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, fn, ": weight must be 2-D [V, d], got shape ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1, fn, ": targets must be 1-D [N], got shape ", targets.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), fn, ": hidden is [N, d] = ", hidden.sizes(),
              " but weight is [V, d] = ", weight.sizes(), ": the hidden sizes differ");
  TORCH_CHECK(targets.size(0) == hidden.size(0), fn, ": targets has ", targets.size(0),
              " entries but hidden has N = ", hidden.size(0), " rows");
  TORCH_CHECK(weight.size(0) > 0, fn, ": weight has an empty vocabulary (V = 0)");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
              ": hidden dtype must be float64, float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, fn, ": hidden is ", dt, " but weight is ", weight.scalar_type(),
              " (they must share a dtype)");
  TORCH_CHECK(targets.scalar_type() == at::kLong, fn, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(chunk >= 0, fn, ": chunk must be >= 0 (0 = default), got ", chunk);
}

// The backward's extra inputs: grad_logp and lse are floating [N] tensors on hidden's device.
inline void check_backward_inputs(const at::Tensor& grad_logp, const at::Tensor& lse, const at::Tensor& hidden,
                                  const char* fn) {
  const int64_t N = hidden.size(0);
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == N, fn, ": grad_logp must be [N] = [", N, "], got ",
              grad_logp.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == N, fn, ": lse must be [N] = [", N, "], got ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(grad_logp.scalar_type()) && at::isFloatingType(lse.scalar_type()), fn,
              ": grad_logp and lse must be floating point, got ", grad_logp.scalar_type(), " and ",
              lse.scalar_type());
  TORCH_CHECK(grad_logp.device() == hidden.device() && lse.device() == hidden.device(), fn,
              ": grad_logp and lse must be on ", hidden.device(), " (got ", grad_logp.device(), ", ",
              lse.device(), ")");
}

// Rows whose target is ignore_index are dropped before any product (prompt tokens cost nothing) and come
// back as zeros.
struct KeptRows {
  at::Tensor idx;  // indices of the kept rows; undefined when every row is kept
  int64_t n = 0;   // number of kept rows

  at::Tensor select(const at::Tensor& x) const { return idx.defined() ? x.index_select(0, idx) : x; }
  // x [n, ...] back to [N, ...], zeros at the dropped rows
  at::Tensor scatter(const at::Tensor& x, int64_t N) const {
    if (!idx.defined()) return x;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape[0] = N;
    return at::zeros(shape, x.options()).index_copy_(0, idx, x);
  }
};

// The one check of the target range in C++ (a target outside [0, V) would index outside the weight in the
// gradient gather), then the kept rows. Names the first bad position; one host sync on CUDA.
inline KeptRows keep_rows(const at::Tensor& targets, int64_t ignore_index, int64_t V, const char* fn) {
  const at::Tensor kept = targets.ne(ignore_index);
  const at::Tensor bad = kept.logical_and(targets.lt(0).logical_or(targets.ge(V)));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero().select(1, 0).min().item<int64_t>();
    TORCH_CHECK(false, fn, ": targets[", i, "] = ", targets[i].item<int64_t>(), " is outside the vocabulary [0, ",
                V, ") and is not ignore_index (", ignore_index, ")");
  }
  KeptRows rows;
  rows.n = kept.sum().item<int64_t>();
  if (rows.n != targets.size(0)) rows.idx = kept.nonzero().select(1, 0);
  return rows;
}

// What an entry point works on once its inputs are checked (each backend's checked_inputs: its own checks,
// check_inputs, then prepare_inputs and its pick_chunk).
struct Inputs {
  at::Tensor hidden, weight, targets;  // contiguous, all N rows
  int64_t N = 0, d = 0, V = 0;
  KeptRows rows;
  int64_t chunk = 0;  // vocabulary rows per chunk, set by the backend
};

// Contiguous inputs (CUDA copies other input; the CPU refuses it, so there this copies nothing), their sizes
// and the kept rows.
inline Inputs prepare_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                             int64_t ignore_index, const char* fn) {
  Inputs in;
  in.hidden = hidden.contiguous();
  in.weight = weight.contiguous();
  in.targets = targets.contiguous();
  in.N = hidden.size(0);
  in.d = hidden.size(1);
  in.V = weight.size(0);
  in.rows = keep_rows(in.targets, ignore_index, in.V, fn);
  return in;
}

}  // namespace tpo_lite

// Fused linear log-probs on CUDA: per-token log p(target) straight from hidden states and the LM head,
// without materialising the N x V logits. Same entry points, signatures and results as the CPU build
// (csrc/cpu/linear_logprobs.cpp); the math and the contract are in docs/kernels.md.
//
// The vocabulary is walked in chunks of `chunk` weight rows. Per chunk:
//   1. raw = hidden @ W_chunk^T with at::mm (cuBLAS, input dtype, fp32 accumulate; bf16/fp16 inputs write an
//      fp32 result through the mm.dtype overload so the logits are not rounded to 8 mantissa bits),
//   2. `chunk_forward_kernel` (one block per row) applies logit_scale / softcap, updates the running max `m`
//      and running sum `S` of exp(z - m) (online log-sum-exp, fp32; fp64 for fp64 input), picks up the
//      target logit when the target falls inside the chunk and, when a gradient is wanted, writes
//      P~ = exp(z - m_new) * f'(a) in the input dtype plus the per-row factor alpha = exp(m_old - m_new),
//   3. E = alpha * E + P~ @ W_chunk (second at::mm; flash-attention-style rescaling of the accumulator).
// At the end `finalize_kernel` gives logp = z_t - (m + log S) and J = s (f'_t w_t - E / S) = d logp / d h,
// so the frozen-head backward is a per-token scale of J (done by the caller) with no second vocab pass.
// The recompute backward (`linear_logprobs_backward`) walks the chunks again: raw logits, then
// `chunk_grad_kernel` forms G = g s f' (onehot - p) in the input dtype, grad_W_chunk = G^T h and
// grad_h += G W_chunk. Each grad_weight chunk is written exactly once, so there are no float atomics.
// Rows whose target is ignore_index are dropped before any product.
// Only the headers used (not <ATen/ATen.h>): nvcc parses the translation unit once per GPU architecture plus
// once for the host, so a lighter include set is what keeps the compile check short.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>
#ifndef TORCH_VERSION_MINOR
#error "torch/version.h did not define TORCH_VERSION_MAJOR/MINOR (needed to pick the mm overload)"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace tpo_lite {
namespace {

constexpr int kThreads = 256;  // threads per row-block; 8 warps
constexpr int kWarps = kThreads / 32;

// Device math in the accumulation type. setup.py builds without --use_fast_math, but a JIT build may add it;
// the code stays accurate either way: exp is only evaluated at z - m <= 0 (the fast __expf is within a few
// ulp there), log at S >= 1, and tanh goes through expm1f, which has no fast-math substitute (the fast tanhf,
// tanh.approx, is only good to ~5e-4 relative: 0.015 on a logit capped at 30).
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dtanh(float x) {
  const float e = expm1f(-2.0f * fabsf(x));  // in (-1, 0]; exact near 0 where 1 - exp would cancel
  return copysignf(-e / (2.0f + e), x);
}
__device__ __forceinline__ double dtanh(double x) {  // same form: libdevice tanh spills registers here
  const double e = expm1(-2.0 * fabs(x));
  return copysign(-e / (2.0 + e), x);
}

__device__ __forceinline__ float neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide max / sum over kThreads threads; every thread gets the result. `smem` holds kWarps values.
// The trailing __syncthreads lets the caller reuse `smem` for the next reduction.
template <typename T>
__device__ __forceinline__ T block_max(T v, T* smem) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = max(r, smem[w]);
  __syncthreads();
  return r;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r += smem[w];  // fixed order: deterministic
  __syncthreads();
  return r;
}

// z = f(s * raw) with f the identity or c * tanh(. / c); f'(a) = 1 - tanh^2 = 1 - (z / c)^2.
template <typename acc_t>
struct Cap {
  acc_t scale, cap, inv_cap;  // cap <= 0: no softcap
  __device__ __forceinline__ acc_t z(acc_t raw) const {
    const acc_t a = scale * raw;
    return cap > acc_t(0) ? cap * dtanh(a * inv_cap) : a;
  }
  __device__ __forceinline__ acc_t dz(acc_t z) const {
    if (cap > acc_t(0)) {
      const acc_t t = z * inv_cap;
      return acc_t(1) - t * t;
    }
    return acc_t(1);
  }
};

// One block per (compacted) row i. raw: [n, c] logits of vocab rows [v0, v0 + c). m, S: running max and sum
// (m starts at -inf, S at 0). zt: capped target logit, written by the one thread whose column is the target.
// P (nullable): P~ = exp(z - m_new) f'(a) in the input dtype; alpha (nullable): exp(m_old - m_new).
// P may alias raw (fp32 / fp64 inputs write P~ over the logits): element j is read and then written by the
// same thread, after the max pass has finished reading, so raw and P are deliberately not __restrict__.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) chunk_forward_kernel(
    const acc_t* raw, int64_t c, int64_t v0, const int64_t* __restrict__ targets, Cap<acc_t> f,
    acc_t* __restrict__ m, acc_t* __restrict__ S, acc_t* __restrict__ zt, scalar_t* P,
    acc_t* __restrict__ alpha) {
  __shared__ acc_t smem[kWarps];
  const int64_t i = blockIdx.x;
  const acc_t* row = raw + i * c;
  const int64_t t_local = targets[i] - v0;

  const acc_t m_old = m[i];
  acc_t m_new, chunk_sum;
  if (P == nullptr) {
    // No gradient wanted: a single read of the chunk row, each thread keeping its own online (max, sum),
    // merged across the block at the end.
    acc_t tm = neg_inf(acc_t(0)), ts = 0;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const acc_t z = f.z(row[j]);
      if (j == t_local) zt[i] = z;
      if (z > tm) {
        ts = ts * dexp(tm - z) + acc_t(1);  // first element: 0 * exp(-inf) + 1
        tm = z;
      } else {
        ts += dexp(z - tm);
      }
    }
    m_new = max(m_old, block_max(tm, smem));
    // A thread that saw no element has tm = -inf, ts = 0 and adds exp(-inf) * 0 = 0.
    chunk_sum = block_sum(ts * dexp(tm - m_new), smem);
  } else {
    // P~ needs the chunk's final max before the first write: a max pass, then a second read of the row
    // (just read by this block, so it comes from L2; recomputing tanh is cheaper than holding c / kThreads
    // values per thread in registers for arbitrary c).
    acc_t local_max = neg_inf(acc_t(0));
    for (int64_t j = threadIdx.x; j < c; j += kThreads) local_max = max(local_max, f.z(row[j]));
    m_new = max(m_old, block_max(local_max, smem));
    acc_t local_sum = 0;
    scalar_t* prow = P + i * c;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const acc_t z = f.z(row[j]);
      const acc_t e = dexp(z - m_new);
      local_sum += e;
      prow[j] = static_cast<scalar_t>(e * f.dz(z));
      if (j == t_local) zt[i] = z;
    }
    chunk_sum = block_sum(local_sum, smem);
  }
  if (threadIdx.x == 0) {
    // m_old == -inf on the first chunk: exp(-inf) = 0 wipes the (zero) history, as it should.
    const acc_t a = dexp(m_old - m_new);
    S[i] = S[i] * a + chunk_sum;
    m[i] = m_new;
    if (alpha) alpha[i] = a;
  }
}

// One block per compacted row: lse = m + log S, logp = zt - lse, and (when E is given)
// J = s (f'_t w_t - E / S) in the accumulation type.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(
    const acc_t* __restrict__ m, const acc_t* __restrict__ S, const acc_t* __restrict__ zt,
    const int64_t* __restrict__ targets, Cap<acc_t> f, const scalar_t* __restrict__ weight, int64_t d,
    const acc_t* __restrict__ E, acc_t* __restrict__ logp, acc_t* __restrict__ lse, acc_t* __restrict__ J) {
  const int64_t i = blockIdx.x;
  const acc_t l = m[i] + dlog(S[i]);
  if (threadIdx.x == 0) {
    lse[i] = l;
    logp[i] = zt[i] - l;
  }
  if (E == nullptr) return;
  const acc_t inv_S = acc_t(1) / S[i];
  const acc_t dzt = f.dz(zt[i]);
  const scalar_t* wt = weight + targets[i] * d;
  const acc_t* e = E + i * d;
  acc_t* jr = J + i * d;
  for (int64_t k = threadIdx.x; k < d; k += kThreads)
    jr[k] = f.scale * (dzt * static_cast<acc_t>(wt[k]) - e[k] * inv_S);
}

// One block per compacted row: G[i, j] = g_i s f'(a_ij) (1[v0 + j == t_i] - exp(z_ij - lse_i)), input dtype.
// G may alias raw (fp32 / fp64), element by element within one thread, hence no __restrict__ on either.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) chunk_grad_kernel(
    const acc_t* raw, int64_t c, int64_t v0, const int64_t* __restrict__ targets, Cap<acc_t> f,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ grad, scalar_t* G) {
  const int64_t i = blockIdx.x;
  const acc_t* row = raw + i * c;
  scalar_t* grow = G + i * c;
  const int64_t t_local = targets[i] - v0;
  const acc_t l = lse[i];
  const acc_t gs = grad[i] * f.scale;
  for (int64_t j = threadIdx.x; j < c; j += kThreads) {
    const acc_t z = f.z(row[j]);
    const acc_t p = dexp(z - l);
    const acc_t onehot = j == t_local ? acc_t(1) : acc_t(0);
    grow[j] = static_cast<scalar_t>(gs * f.dz(z) * (onehot - p));
  }
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// a @ b with the result in `acc` (fp32, or fp64 for fp64 input). For bf16/fp16 the mm.dtype overload lets
// cuBLAS write its fp32 accumulator directly instead of rounding to the input dtype.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(a, b, acc);
#else
  // torch < 2.8 has no mm.dtype overload: up-cast the operands instead (exact; one extra copy per chunk).
  return at::mm(a.to(acc), b.to(acc));
#endif
}

// Vocab chunk: the caller's value, else at most 16M logits per chunk (64 MiB in fp32), 2048..16384 columns:
// wide enough that each product keeps the GPU busy, small enough that the chunk buffers stay far below the
// N x V logits (at N = 2048: 8192 columns, 1/18 of V = 151936).
int64_t pick_chunk(int64_t chunk, int64_t n, int64_t V) {
  if (chunk <= 0) {
    chunk = 16384;
    while (chunk > 2048 && chunk * std::max<int64_t>(n, 1) > (int64_t(1) << 24)) chunk /= 2;
  }
  return std::max<int64_t>(1, std::min(chunk, V));
}

Cap<double> make_cap(double logit_scale, double softcap) {
  return Cap<double>{logit_scale, softcap > 0 ? softcap : 0.0, softcap > 0 ? 1.0 / softcap : 0.0};
}

template <typename acc_t>
Cap<acc_t> cast_cap(const Cap<double>& c) {
  return Cap<acc_t>{static_cast<acc_t>(c.scale), static_cast<acc_t>(c.cap), static_cast<acc_t>(c.inv_cap)};
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t chunk,
                  const char* fn) {
  TORCH_CHECK(hidden.is_cuda() && weight.is_cuda() && targets.is_cuda(), fn,
              ": hidden, weight and targets must be CUDA tensors (got ", hidden.device(), ", ", weight.device(),
              ", ", targets.device(), ")");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == targets.device(), fn,
              ": hidden, weight and targets must be on the same device (got ", hidden.device(), ", ",
              weight.device(), ", ", targets.device(), ")");
  TORCH_CHECK(hidden.dim() == 2, fn, ": hidden must be 2-D [N, d], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, fn, ": weight must be 2-D [V, d], got shape ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1, fn, ": targets must be 1-D [N], got shape ", targets.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), fn, ": hidden is [N, ", hidden.size(1), "] but weight is [V, ",
              weight.size(1), "]: the hidden sizes differ");
  TORCH_CHECK(targets.size(0) == hidden.size(0), fn, ": targets has ", targets.size(0), " entries but hidden has ",
              hidden.size(0), " rows");
  TORCH_CHECK(weight.size(0) > 0, fn, ": weight has no rows (V = 0)");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), fn, ": hidden (", hidden.scalar_type(),
              ") and weight (", weight.scalar_type(), ") must share a dtype");
  const auto st = hidden.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, fn,
              ": dtype must be float64, float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(targets.scalar_type() == at::kLong, fn, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(chunk >= 0, fn, ": chunk must be >= 0 (0 = default), got ", chunk);
}

// Valid (non-ignored) rows: index tensor (undefined when every row is valid) and the compacted inputs.
// Out-of-range targets are an error (one device sync, the price of a clear message instead of a crash).
struct Rows {
  at::Tensor idx;  // undefined: all rows valid
  at::Tensor hidden, targets;
  int64_t n = 0;
};

Rows compact_rows(const at::Tensor& hidden, const at::Tensor& targets, int64_t ignore_index, int64_t V,
                  const char* fn) {
  Rows r;
  const at::Tensor valid = targets.ne(ignore_index);
  const at::Tensor bad = valid.logical_and(targets.lt(0).logical_or(targets.ge(V)));
  if (bad.any().item<bool>()) {
    const int64_t pos = bad.nonzero().select(1, 0).min().item<int64_t>();
    TORCH_CHECK(false, fn, ": targets[", pos, "] = ", targets[pos].item<int64_t>(), " is outside [0, ", V,
                ") and is not ignore_index (", ignore_index, ")");
  }
  const int64_t n_valid = valid.sum().item<int64_t>();
  if (n_valid == targets.size(0)) {
    r.hidden = hidden;
    r.targets = targets;
  } else {
    r.idx = valid.nonzero().select(1, 0);
    r.hidden = hidden.index_select(0, r.idx);
    r.targets = targets.index_select(0, r.idx);
  }
  r.n = n_valid;
  return r;
}

// Scatter compacted rows back to full size (zeros at ignored rows).
at::Tensor expand_rows(const at::Tensor& x, const Rows& r, int64_t N) {
  if (!r.idx.defined()) return x;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = N;
  return at::zeros(shape, x.options()).index_copy_(0, r.idx, x);
}

}  // namespace

std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                const at::Tensor& targets_in, int64_t ignore_index,
                                                double logit_scale, double softcap, int64_t chunk,
                                                bool need_grad) {
  const char* fn = "linear_logprobs_forward (CUDA)";
  check_inputs(hidden_in, weight_in, targets_in, chunk, fn);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(),
                   targets = targets_in.contiguous();
  const int64_t N = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  const at::ScalarType acc = acc_type_of(hidden.scalar_type());
  const auto acc_opts = hidden.options().dtype(acc);

  Rows rows = compact_rows(hidden, targets, ignore_index, V, fn);
  const int64_t n = rows.n;
  if (n == 0) {  // every target ignored: zeros, nothing to compute
    return {at::zeros({N}, acc_opts), at::zeros({N}, acc_opts),
            need_grad ? at::zeros({N, d}, acc_opts) : at::empty({0}, acc_opts)};
  }
  const int64_t c = pick_chunk(chunk, n, V);
  const Cap<double> capd = make_cap(logit_scale, softcap);
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor m = at::full({n}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor S = at::zeros({n}, acc_opts);
  at::Tensor zt = at::zeros({n}, acc_opts);
  at::Tensor E = need_grad ? at::zeros({n, d}, acc_opts) : at::Tensor();
  at::Tensor alpha = need_grad ? at::empty({n}, acc_opts) : at::Tensor();
  at::Tensor logp = at::empty({n}, acc_opts), lse = at::empty({n}, acc_opts);
  at::Tensor J = need_grad ? at::empty({n, d}, acc_opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "linear_logprobs_forward_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const Cap<acc_t> f = cast_cap<acc_t>(capd);
    for (int64_t v0 = 0; v0 < V; v0 += c) {
      const int64_t cc = std::min(c, V - v0);
      const at::Tensor Wc = weight.narrow(0, v0, cc);
      const at::Tensor raw = mm_acc(rows.hidden, Wc.t(), acc);  // [n, cc]
      // P~ overwrites the logits when the dtypes agree (fp32 / fp64): one N x chunk buffer instead of two.
      at::Tensor P = !need_grad ? at::Tensor() : (hidden.scalar_type() == acc ? raw : at::empty({n, cc}, hidden.options()));
      chunk_forward_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
          raw.data_ptr<acc_t>(), cc, v0, rows.targets.data_ptr<int64_t>(), f, m.data_ptr<acc_t>(),
          S.data_ptr<acc_t>(), zt.data_ptr<acc_t>(), need_grad ? P.data_ptr<scalar_t>() : nullptr,
          need_grad ? alpha.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad) {
        E.mul_(alpha.unsqueeze(1));
        E.add_(mm_acc(P, Wc, acc));
      }
    }
    finalize_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
        m.data_ptr<acc_t>(), S.data_ptr<acc_t>(), zt.data_ptr<acc_t>(), rows.targets.data_ptr<int64_t>(), f,
        weight.data_ptr<scalar_t>(), d, need_grad ? E.data_ptr<acc_t>() : nullptr, logp.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), need_grad ? J.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  return {expand_rows(logp, rows, N), expand_rows(lse, rows, N),
          need_grad ? expand_rows(J, rows, N) : at::empty({0}, acc_opts)};
}

std::vector<at::Tensor> linear_logprobs_backward(const at::Tensor& grad_logp_in, const at::Tensor& hidden_in,
                                                 const at::Tensor& weight_in, const at::Tensor& targets_in,
                                                 const at::Tensor& lse_in, int64_t ignore_index, double logit_scale,
                                                 double softcap, int64_t chunk, bool need_grad_hidden,
                                                 bool need_grad_weight) {
  const char* fn = "linear_logprobs_backward (CUDA)";
  check_inputs(hidden_in, weight_in, targets_in, chunk, fn);
  const int64_t N = hidden_in.size(0), d = hidden_in.size(1), V = weight_in.size(0);
  TORCH_CHECK(grad_logp_in.dim() == 1 && grad_logp_in.size(0) == N, fn, ": grad_logp must be [", N, "], got ",
              grad_logp_in.sizes());
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == N, fn, ": lse must be [", N, "], got ", lse_in.sizes());
  TORCH_CHECK(grad_logp_in.device() == hidden_in.device() && lse_in.device() == hidden_in.device(), fn,
              ": grad_logp and lse must be on ", hidden_in.device());
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(),
                   targets = targets_in.contiguous();
  const at::ScalarType acc = acc_type_of(hidden.scalar_type());
  const auto acc_opts = hidden.options().dtype(acc);

  at::Tensor grad_hidden = need_grad_hidden ? at::zeros({N, d}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor grad_weight = need_grad_weight ? at::zeros({V, d}, weight.options()) : at::empty({0}, weight.options());
  if (!need_grad_hidden && !need_grad_weight) return {grad_hidden, grad_weight};

  Rows rows = compact_rows(hidden, targets, ignore_index, V, fn);
  const int64_t n = rows.n;
  if (n == 0) return {grad_hidden, grad_weight};
  at::Tensor grad = grad_logp_in.to(acc).contiguous();
  at::Tensor lse = lse_in.to(acc).contiguous();
  if (rows.idx.defined()) {
    grad = grad.index_select(0, rows.idx);
    lse = lse.index_select(0, rows.idx);
  }
  const int64_t c = pick_chunk(chunk, n, V);
  const Cap<double> capd = make_cap(logit_scale, softcap);
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gh = need_grad_hidden ? at::zeros({n, d}, acc_opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "linear_logprobs_backward_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const Cap<acc_t> f = cast_cap<acc_t>(capd);
    for (int64_t v0 = 0; v0 < V; v0 += c) {
      const int64_t cc = std::min(c, V - v0);
      const at::Tensor Wc = weight.narrow(0, v0, cc);
      const at::Tensor raw = mm_acc(rows.hidden, Wc.t(), acc);
      at::Tensor G = hidden.scalar_type() == acc ? raw : at::empty({n, cc}, hidden.options());  // in place when fp32/64
      chunk_grad_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
          raw.data_ptr<acc_t>(), cc, v0, rows.targets.data_ptr<int64_t>(), f, lse.data_ptr<acc_t>(),
          grad.data_ptr<acc_t>(), G.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad_weight) grad_weight.narrow(0, v0, cc).copy_(mm_acc(G.t(), rows.hidden, acc));
      if (need_grad_hidden) gh.add_(mm_acc(G, Wc, acc));
    }
  });

  if (need_grad_hidden) {
    if (rows.idx.defined())
      grad_hidden.index_copy_(0, rows.idx, gh.to(hidden.scalar_type()));
    else
      grad_hidden.copy_(gh);
  }
  return {grad_hidden, grad_weight};
}

}  // namespace tpo_lite

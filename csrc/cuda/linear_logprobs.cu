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

#include "../common.h"
#include "common_cuda.cuh"

namespace tpo_lite {
namespace {

constexpr int kThreads = 256;  // threads per row-block; 8 warps
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
using Cap = Softcap<acc_t, DeviceMath>;

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
        ts = ts * DeviceMath::exp(tm - z) + acc_t(1);  // first element: 0 * exp(-inf) + 1
        tm = z;
      } else {
        ts += DeviceMath::exp(z - tm);
      }
    }
    m_new = max(m_old, block_reduce<kThreads>(tm, smem, Max()));
    // A thread that saw no element has tm = -inf, ts = 0 and adds exp(-inf) * 0 = 0.
    chunk_sum = block_reduce<kThreads>(ts * DeviceMath::exp(tm - m_new), smem, Sum());
  } else {
    // P~ needs the chunk's final max before the first write: a max pass, then a second read of the row
    // (just read by this block, so it comes from L2; recomputing tanh is cheaper than holding c / kThreads
    // values per thread in registers for arbitrary c).
    acc_t local_max = neg_inf(acc_t(0));
    for (int64_t j = threadIdx.x; j < c; j += kThreads) local_max = max(local_max, f.z(row[j]));
    m_new = max(m_old, block_reduce<kThreads>(local_max, smem, Max()));
    acc_t local_sum = 0;
    scalar_t* prow = P + i * c;
    for (int64_t j = threadIdx.x; j < c; j += kThreads) {
      const acc_t z = f.z(row[j]);
      const acc_t e = DeviceMath::exp(z - m_new);
      local_sum += e;
      prow[j] = static_cast<scalar_t>(e * f.dz(z));
      if (j == t_local) zt[i] = z;
    }
    chunk_sum = block_reduce<kThreads>(local_sum, smem, Sum());
  }
  if (threadIdx.x == 0) {
    const acc_t a = lse_merge<DeviceMath>(m[i], S[i], m_new, chunk_sum);
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
  const acc_t l = m[i] + DeviceMath::log(S[i]);
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
    const acc_t p = DeviceMath::exp(z - l);
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

// The start of both entry points: the CUDA build's own checks, the shared ones (shapes, dtypes, chunk; the
// backward's grad_logp and lse when given: common.h), then the contiguous inputs, the kept rows and the chunk.
Inputs checked_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                      int64_t ignore_index, int64_t chunk, const char* fn, const at::Tensor& grad_logp = {},
                      const at::Tensor& lse = {}) {
  TORCH_CHECK(hidden.is_cuda() && weight.is_cuda() && targets.is_cuda(), fn,
              ": hidden, weight and targets must be CUDA tensors (got ", hidden.device(), ", ", weight.device(),
              ", ", targets.device(), ")");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == targets.device(), fn,
              ": hidden, weight and targets must be on the same device (got ", hidden.device(), ", ",
              weight.device(), ", ", targets.device(), ")");
  check_inputs(hidden, weight, targets, chunk, fn);
  if (grad_logp.defined()) check_backward_inputs(grad_logp, lse, hidden, fn);
  Inputs in = prepare_inputs(hidden, weight, targets, ignore_index, fn);
  in.chunk = pick_chunk(chunk, in.rows.n, in.V);
  return in;
}

// The vocabulary in chunks of c weight rows: body(v0, cc, W_chunk, raw) with raw = hidden @ W_chunk^T [n, cc] in
// the accumulation dtype `acc`.
template <typename Body>
void for_each_chunk(const at::Tensor& hidden, const at::Tensor& weight, int64_t c, at::ScalarType acc,
                    const Body& body) {
  const int64_t V = weight.size(0);
  for (int64_t v0 = 0; v0 < V; v0 += c) {
    const int64_t cc = std::min(c, V - v0);
    const at::Tensor Wc = weight.narrow(0, v0, cc);
    body(v0, cc, Wc, mm_acc(hidden, Wc.t(), acc));
  }
}

}  // namespace

std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& targets, int64_t ignore_index,
                                                double logit_scale, double softcap, int64_t chunk,
                                                bool need_grad) {
  const Inputs in = checked_inputs(hidden, weight, targets, ignore_index, chunk, "linear_logprobs_forward (CUDA)");
  c10::cuda::CUDAGuard guard(in.hidden.device());
  const int64_t N = in.N, d = in.d, n = in.rows.n;
  const at::ScalarType dtype = in.hidden.scalar_type(), acc = acc_type_of(dtype);
  const auto opts = in.hidden.options(), acc_opts = opts.dtype(acc);
  if (n == 0) {  // every target ignored: zeros, nothing to compute
    return {at::zeros({N}, acc_opts), at::zeros({N}, acc_opts),
            need_grad ? at::zeros({N, d}, acc_opts) : at::empty({0}, acc_opts)};
  }
  const at::Tensor kept_hidden = in.rows.select(in.hidden), kept_targets = in.rows.select(in.targets);
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor m = at::full({n}, -std::numeric_limits<double>::infinity(), acc_opts);
  at::Tensor S = at::zeros({n}, acc_opts);
  at::Tensor zt = at::zeros({n}, acc_opts);
  at::Tensor E = need_grad ? at::zeros({n, d}, acc_opts) : at::Tensor();
  at::Tensor alpha = need_grad ? at::empty({n}, acc_opts) : at::Tensor();
  at::Tensor logp = at::empty({n}, acc_opts), lse = at::empty({n}, acc_opts);
  at::Tensor J = need_grad ? at::empty({n, d}, acc_opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "linear_logprobs_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const Cap<acc_t> f = Cap<acc_t>::make(logit_scale, softcap);
    for_each_chunk(kept_hidden, in.weight, in.chunk, acc, [&](int64_t v0, int64_t cc, const at::Tensor& Wc,
                                                                const at::Tensor& raw) {
      // P~ overwrites the logits when the dtypes agree (fp32 / fp64): one N x chunk buffer instead of two.
      const at::Tensor P = !need_grad ? at::Tensor() : (dtype == acc ? raw : at::empty({n, cc}, opts));
      chunk_forward_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
          raw.data_ptr<acc_t>(), cc, v0, kept_targets.data_ptr<int64_t>(), f, m.data_ptr<acc_t>(),
          S.data_ptr<acc_t>(), zt.data_ptr<acc_t>(), need_grad ? P.data_ptr<scalar_t>() : nullptr,
          need_grad ? alpha.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad) {
        E.mul_(alpha.unsqueeze(1));
        E.add_(mm_acc(P, Wc, acc));
      }
    });
    finalize_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
        m.data_ptr<acc_t>(), S.data_ptr<acc_t>(), zt.data_ptr<acc_t>(), kept_targets.data_ptr<int64_t>(), f,
        in.weight.data_ptr<scalar_t>(), d, need_grad ? E.data_ptr<acc_t>() : nullptr, logp.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), need_grad ? J.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  return {in.rows.scatter(logp, N), in.rows.scatter(lse, N),
          need_grad ? in.rows.scatter(J, N) : at::empty({0}, acc_opts)};
}

std::vector<at::Tensor> linear_logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& hidden,
                                                 const at::Tensor& weight, const at::Tensor& targets,
                                                 const at::Tensor& lse_all, int64_t ignore_index, double logit_scale,
                                                 double softcap, int64_t chunk, bool need_grad_hidden,
                                                 bool need_grad_weight) {
  const Inputs in = checked_inputs(hidden, weight, targets, ignore_index, chunk, "linear_logprobs_backward (CUDA)",
                                   grad_logp, lse_all);
  c10::cuda::CUDAGuard guard(in.hidden.device());
  const int64_t N = in.N, d = in.d, n = in.rows.n;
  const at::ScalarType dtype = in.hidden.scalar_type(), acc = acc_type_of(dtype);
  const auto opts = in.hidden.options();  // weight's too: same dtype and device
  at::Tensor grad_hidden = need_grad_hidden ? at::zeros({N, d}, opts) : at::empty({0}, opts);
  at::Tensor grad_weight = need_grad_weight ? at::zeros({in.V, d}, opts) : at::empty({0}, opts);
  if ((!need_grad_hidden && !need_grad_weight) || n == 0) return {grad_hidden, grad_weight};
  const at::Tensor kept_hidden = in.rows.select(in.hidden), kept_targets = in.rows.select(in.targets);
  const at::Tensor grad = in.rows.select(grad_logp.to(acc).contiguous());
  const at::Tensor lse = in.rows.select(lse_all.to(acc).contiguous());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gh = need_grad_hidden ? at::zeros({n, d}, opts.dtype(acc)) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "linear_logprobs_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const Cap<acc_t> f = Cap<acc_t>::make(logit_scale, softcap);
    for_each_chunk(kept_hidden, in.weight, in.chunk, acc, [&](int64_t v0, int64_t cc, const at::Tensor& Wc,
                                                                const at::Tensor& raw) {
      const at::Tensor G = dtype == acc ? raw : at::empty({n, cc}, opts);  // in place when fp32/64
      chunk_grad_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
          raw.data_ptr<acc_t>(), cc, v0, kept_targets.data_ptr<int64_t>(), f, lse.data_ptr<acc_t>(),
          grad.data_ptr<acc_t>(), G.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_grad_weight) grad_weight.narrow(0, v0, cc).copy_(mm_acc(G.t(), kept_hidden, acc));
      if (need_grad_hidden) gh.add_(mm_acc(G, Wc, acc));
    });
  });

  if (need_grad_hidden) grad_hidden = in.rows.scatter(gh.to(dtype), N);
  return {grad_hidden, grad_weight};
}

}  // namespace tpo_lite

// CUDA-only helpers of the kernels in csrc/cuda: device math (the `Math` policy of ../common.h) and warp /
// block reductions. The CPU side reduces with `omp simd` instead, so these cannot be shared with it.
#pragma once

#include <cuda_runtime.h>

namespace tpo_lite {

// Device math in the accumulation type. setup.py builds without --use_fast_math, but a JIT build may add it;
// the code stays accurate either way: exp is only evaluated at z - m <= 0 (the fast __expf is within a few
// ulp there), log at S >= 1, and tanh goes through expm1f, which has no fast-math substitute (the fast tanhf,
// tanh.approx, is only good to ~5e-4 relative: 0.015 on a logit capped at 30).
struct DeviceMath {
  __host__ __device__ __forceinline__ static float exp(float x) { return expf(x); }
  __host__ __device__ __forceinline__ static double exp(double x) { return ::exp(x); }
  __host__ __device__ __forceinline__ static float log(float x) { return logf(x); }
  __host__ __device__ __forceinline__ static double log(double x) { return ::log(x); }
  __host__ __device__ __forceinline__ static float tanh(float x) {
    const float e = expm1f(-2.0f * fabsf(x));  // in (-1, 0]; exact near 0 where 1 - exp would cancel
    return copysignf(-e / (2.0f + e), x);
  }
  __host__ __device__ __forceinline__ static double tanh(double x) {  // same form: libdevice tanh spills here
    const double e = expm1(-2.0 * fabs(x));
    return copysign(-e / (2.0 + e), x);
  }
};

__device__ __forceinline__ float neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }

// The reduction operators of block_reduce.
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return max(a, b); }
};
struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide `op` (Max, Sum) over kThreads threads (a multiple of 32); every thread gets the result. `smem`
// holds kThreads / 32 values. The warps' partials are combined in warp order, the same on every run, so a sum
// is deterministic. The trailing __syncthreads lets the caller reuse `smem` for the next reduction.
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* smem, Op op) {
  static_assert(kThreads % 32 == 0, "block_reduce: whole warps only");
  v = warp_reduce(v, op);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) r = op(r, smem[w]);
  __syncthreads();
  return r;
}

}  // namespace tpo_lite

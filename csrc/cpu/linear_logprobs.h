// Fused linear log-probs (CPU). Contract shared with the CUDA build: docs/kernels.md.
#pragma once

#include <ATen/ATen.h>  // bindings.cpp alone pulls in torch/extension.h (Python)

#include <vector>

namespace tpo_lite {

// -> {logp [N], lse [N], J [N, d] = d logp / d hidden (empty unless need_grad)}; fp32 (fp64 for fp64 input)
std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& targets, int64_t ignore_index,
                                                double logit_scale, double softcap, int64_t chunk,
                                                bool need_grad);

// Recomputes the logits chunk by chunk -> {grad_hidden [N, d] (hidden dtype), grad_weight [V, d] (weight
// dtype)}; each is an empty tensor when not requested.
std::vector<at::Tensor> linear_logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& hidden,
                                                 const at::Tensor& weight, const at::Tensor& targets,
                                                 const at::Tensor& lse, int64_t ignore_index, double logit_scale,
                                                 double softcap, int64_t chunk, bool need_grad_hidden,
                                                 bool need_grad_weight);

}  // namespace tpo_lite

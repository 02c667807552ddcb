// Python bindings of the CUDA kernels (module tpo_lite._C_cuda, or the JIT-compiled equivalent).
// The declarations come from the CPU header on purpose: the CUDA build must expose the same names and
// signatures (docs/kernels.md), and a drift between the two then fails to link instead of misbehaving.
#include <torch/extension.h>

#include "../cpu/linear_logprobs.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tpo-lite CUDA kernels (same entry points as tpo_lite._C)";
  m.def("linear_logprobs_forward", &tpo_lite::linear_logprobs_forward,
        "Fused linear log-probs forward on CUDA -> (logp[N], lse[N], J[N,d] or empty); see docs/kernels.md",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("ignore_index"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("chunk"), py::arg("need_grad"));
  m.def("linear_logprobs_backward", &tpo_lite::linear_logprobs_backward,
        "Fused linear log-probs backward on CUDA by recompute -> (grad_hidden or empty, grad_weight or empty)",
        py::arg("grad_logp"), py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("lse"),
        py::arg("ignore_index"), py::arg("logit_scale"), py::arg("softcap"), py::arg("chunk"),
        py::arg("need_grad_hidden"), py::arg("need_grad_weight"));
}

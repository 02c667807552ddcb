// Python bindings of the CPU kernels (module tpo_lite._C, or the JIT-compiled equivalent).
// Every op in csrc/cpu/ is registered here so the extension has a single PYBIND11_MODULE.
#include <torch/extension.h>

#include "linear_logprobs.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tpo-lite CPU kernels";
  m.def("linear_logprobs_forward", &tpo_lite::linear_logprobs_forward,
        "Fused linear log-probs forward -> (logp[N], lse[N], J[N,d] or empty); see docs/kernels.md",
        py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("ignore_index"), py::arg("logit_scale"),
        py::arg("softcap"), py::arg("chunk"), py::arg("need_grad"),
        py::call_guard<py::gil_scoped_release>());  // pure ATen inside: let other Python threads run
  m.def("linear_logprobs_backward", &tpo_lite::linear_logprobs_backward,
        "Fused linear log-probs backward by recompute -> (grad_hidden or empty, grad_weight or empty)",
        py::arg("grad_logp"), py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("lse"),
        py::arg("ignore_index"), py::arg("logit_scale"), py::arg("softcap"), py::arg("chunk"),
        py::arg("need_grad_hidden"), py::arg("need_grad_weight"), py::call_guard<py::gil_scoped_release>());
}

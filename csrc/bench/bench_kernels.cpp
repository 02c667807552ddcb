// Standalone benchmark of the fused linear log-probs kernel (built by CMakeLists.txt, no Python packaging).
//
// One frozen-head training step per method, fwd + bwd to the hidden states, timed as the median of
// interleaved runs:
//   fused  tpo_lite::linear_logprobs_forward(need_grad=true), then grad_h = grad_logp * J (the per-row scale)
//   eager  logits = h W^T -> log_softmax (fp32) -> gather; backward by hand: grad_h = (onehot - softmax) W
//   floor  the two bare N x d x V products: (h W^T) W
// and the largest |fused - eager| log-prob. Built twice: `tpo_lite_bench` links the CPU kernels and runs on
// the CPU; `tpo_lite_bench_cuda` (-DTPO_LITE_BENCH_CUDA) links the CUDA kernels and runs on the GPU. The two
// kernel libraries define the same symbols, so one executable links only one of them.
//
// usage: tpo_lite_bench [--N 2048] [--d 896] [--V 151936] [--dtype float32|bfloat16|float16|float64]
//                       [--repeats 5] [--chunk 0] [--threads 0]
// The Python benchmark (`tpo-lite bench kernels`) is the full comparison (torch.compile, Liger, memory).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef TPO_LITE_BENCH_CUDA
#include <cuda_runtime.h>
#endif

#include "../common.h"  // kIgnoreIndex

// The kernel entry points (docs/kernels.md). Declared here rather than through the extension header so this
// executable needs neither Python nor pybind11.
namespace tpo_lite {
std::vector<at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                const at::Tensor& targets, int64_t ignore_index,
                                                double logit_scale, double softcap, int64_t chunk,
                                                bool need_grad);
}  // namespace tpo_lite

namespace {

struct Args {
  int64_t N = 2048, d = 896, V = 151936, repeats = 5, chunk = 0, threads = 0;
  std::string dtype = "float32";
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "tpo_lite_bench: %s\nusage: tpo_lite_bench [--N n] [--d d] [--V v] "
               "[--dtype float32|bfloat16|float16|float64] [--repeats r] [--chunk c] [--threads t]\n",
               why.c_str());
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  std::map<std::string, int64_t*> ints = {{"--N", &a.N},         {"--d", &a.d},         {"--V", &a.V},
                                          {"--repeats", &a.repeats}, {"--chunk", &a.chunk}, {"--threads", &a.threads}};
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "-h" || key == "--help") usage("help");
    if (i + 1 >= argc) usage("missing value after " + key);
    const std::string val = argv[++i];
    if (key == "--dtype") {
      a.dtype = val;
    } else if (ints.count(key)) {
      char* end = nullptr;
      const long long v = std::strtoll(val.c_str(), &end, 10);
      if (end == val.c_str() || *end != '\0') usage(key + " needs an integer, got '" + val + "'");
      *ints[key] = v;
    } else {
      usage("unknown option " + key);
    }
  }
  if (a.N <= 0 || a.d <= 0 || a.V <= 0) usage("--N, --d and --V must be positive");
  if (a.repeats < 1) usage("--repeats must be >= 1");
  if (a.chunk < 0) usage("--chunk must be >= 0 (0 = the kernel's default)");
  return a;
}

at::ScalarType dtype_of(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  if (name == "float64") return at::kDouble;
  usage("unknown --dtype " + name);
}

void sync() {
#ifdef TPO_LITE_BENCH_CUDA
  cudaDeviceSynchronize();
#endif
}

double time_ms(const std::function<void()>& step) {
  sync();
  const auto t0 = std::chrono::steady_clock::now();
  step();
  sync();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  if (a.threads > 0) at::set_num_threads(static_cast<int>(a.threads));
#ifdef TPO_LITE_BENCH_CUDA
  const at::Device device(at::kCUDA, 0);
  const char* device_name = "cuda";
#else
  const at::Device device(at::kCPU);
  const char* device_name = "cpu";
#endif
  const at::ScalarType dt = dtype_of(a.dtype);
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(dt).device(device);
  const at::Tensor hidden = at::randn({a.N, a.d}, at::kFloat).to(opts);
  const at::Tensor weight = (at::randn({a.V, a.d}, at::kFloat) * (2.0 / std::sqrt(double(a.d)))).to(opts);
  const at::Tensor targets = at::randint(0, a.V, {a.N}, at::TensorOptions().dtype(at::kLong)).to(device);
  const at::Tensor grad_logp = at::ones({a.N}, at::TensorOptions().dtype(dt == at::kDouble ? at::kDouble : at::kFloat).device(device));

  at::Tensor sink;  // keeps each step's result alive until the step is timed
  std::map<std::string, std::function<void()>> steps;
  steps["fused"] = [&] {
    const auto out =
        tpo_lite::linear_logprobs_forward(hidden, weight, targets, tpo_lite::kIgnoreIndex, 1.0, 0.0, a.chunk, true);
    sink = (grad_logp.unsqueeze(1) * out[2]).to(dt);
  };
  steps["eager"] = [&] {
    const at::Tensor logp_all = at::log_softmax(at::mm(hidden, weight.t()).to(grad_logp.scalar_type()), 1);
    at::Tensor g = logp_all.exp().neg_();  // d(sum logp_t)/d logits = onehot - softmax
    g.scatter_add_(1, targets.unsqueeze(1), at::ones({a.N, 1}, g.options()));
    sink = at::mm(g.to(dt), weight);
  };
  steps["floor"] = [&] { sink = at::mm(at::mm(hidden, weight.t()), weight); };

  const std::vector<std::string> order = {"fused", "eager", "floor"};
  std::map<std::string, std::vector<double>> times;
  try {
    for (const auto& m : order) steps[m]();  // warm-up
    for (int64_t r = 0; r < a.repeats; ++r)
      for (size_t k = 0; k < order.size(); ++k) {
        const auto& m = order[(k + r) % order.size()];  // rotate so no method always follows the same one
        times[m].push_back(time_ms(steps[m]));
      }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tpo_lite_bench: %s\n", e.what());
    return 1;
  }

  const at::Tensor fused_logp =
      tpo_lite::linear_logprobs_forward(hidden, weight, targets, tpo_lite::kIgnoreIndex, 1.0, 0.0, a.chunk, false)[0];
  const at::Tensor eager_logp =
      at::log_softmax(at::mm(hidden, weight.t()).to(fused_logp.scalar_type()), 1).gather(1, targets.unsqueeze(1)).squeeze(1);
  const double max_diff = (fused_logp - eager_logp).abs().max().item<double>();

  std::printf("device=%s dtype=%s N=%lld d=%lld V=%lld threads=%d repeats=%lld\n", device_name, a.dtype.c_str(),
              (long long)a.N, (long long)a.d, (long long)a.V, at::get_num_threads(), (long long)a.repeats);
  std::map<std::string, double> med;
  for (const auto& m : order) {
    med[m] = median(times[m]);
    std::printf("%-6s median %12.4f ms\n", m.c_str(), med[m]);
  }
  std::printf("fused/eager %.3f  fused/floor %.3f  max|fused-eager| logp %.3g\n", med["fused"] / med["eager"],
              med["fused"] / med["floor"], max_diff);
  return 0;
}

"""Builds tpo_lite and its kernel extension.

Install with ``pip install --no-build-isolation .`` so the extension compiles against the torch you already
have. The CPU extension is always built; the CUDA one when torch has CUDA and nvcc is found. With
``TPO_LITE_NO_EXT=1``, or in a build environment without torch (an isolated build), nothing is compiled: a
pure-python wheel, whose kernels JIT-compile from the sources the package carries on first use (else the ops
fall back to the PyTorch reference with a warning). docs/kernels-build.md: the sdist and wheels, and their test.
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
compile_ext = not os.environ.get("TPO_LITE_NO_EXT")
if compile_ext and importlib.util.find_spec("torch") is None:
    # an isolated build (`pip install .`, `python -m build`) has no torch: build the pure wheel rather than fail
    print("setup.py: torch is not importable in this build environment (an isolated build?), so the kernel "
          "extension is not compiled: the kernels JIT-compile on first use. To compile them now, install torch "
          "first and build with --no-build-isolation.", file=sys.stderr)
    compile_ext = False
if compile_ext:
    from torch.utils import cpp_extension

    # no -std flag: torch passes its own standard (C++20 for torch 2.13) and a later -std=c++17 would override
    # it; no -march flag: csrc/cpu uses target_clones to pick AVX-512 / AVX2 at load time
    cxx_flags = ["-O3", "-fopenmp"]

    def files(folder, *suffixes):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffixes))

    # The headers (csrc/common.h, shared by both builds, is included by relative path): listed as depends so
    # that a header change rebuilds the extension (setuptools compares only sources and depends with the .so).
    headers = [*files("csrc", ".h"), *files(os.path.join("csrc", "cpu"), ".h"),
               *files(os.path.join("csrc", "cuda"), ".cuh")]
    cpu_sources = files(os.path.join("csrc", "cpu"), ".cpp")
    if cpu_sources:
        ext_modules.append(
            cpp_extension.CppExtension(
                "tpo_lite._C", cpu_sources, depends=headers, extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-fopenmp"],
            )
        )
    import torch

    cuda_sources = files(os.path.join("csrc", "cuda"), ".cu", ".cpp")
    if cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME:
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "tpo_lite._C_cuda",
                cuda_sources,
                depends=headers,
                # No --use_fast_math: the online log-sum-exp needs accurate exp/log/tanh for logits up to 1e4.
                # No -std flag, as for the CPU part: torch passes its own (C++20 for torch 2.13; the sources also
                # build as C++17, which tests/test_cuda_compile.py checks).
                # The GPU architectures come from TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), else the local GPU.
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    if ext_modules:
        cmdclass["build_ext"] = cpp_extension.BuildExtension

setup(
    name="tpo-lite",
    version="0.1.0",
    description="Thought Preference Optimization (TPO) on one GPU: fused QLoRA DPO kernels and the TPO loop",
    # csrc/ and examples/ stay at the repo root (one copy); the sdist and the wheel carry them as tpo_lite/csrc
    # (the JIT builds from it when no compiled extension fits) and tpo_lite/examples (`tpo-lite examples`).
    packages=[*find_packages(include=["tpo_lite", "tpo_lite.*"]), "tpo_lite.csrc", "tpo_lite.examples"],
    package_dir={"tpo_lite.csrc": "csrc", "tpo_lite.examples": "examples"},
    package_data={
        "tpo_lite": ["data/*.jsonl", "data/*.txt"],
        "tpo_lite.csrc": ["*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cpp", "cuda/*.cuh"],
        "tpo_lite.examples": ["*.toml"],
    },
    # only the files above: MANIFEST.in's extras (the CMake build, csrc/bench) are for the sdist
    include_package_data=False,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "gguf>=0.10",
        "peft>=0.13",
        "accelerate>=1.0",
        "bitsandbytes>=0.45",
        "pybind11>=2.12",
        "ninja",
        "click>=8.1",
        "tqdm",
        "matplotlib>=3.7",
        "numpy",
    ],
    # loop.report_to's trackers are optional: `pip install tpo-lite[tensorboard]` (or trackio, wandb)
    # datasets: training instructions / eval sets from the `datasets` library (tpo_lite/datasets_source.py)
    extras_require={"test": ["pytest", "tensorboard", "datasets>=2.19"], "tensorboard": ["tensorboard"],
                    "trackio": ["trackio"], "wandb": ["wandb"], "datasets": ["datasets>=2.19"]},
    entry_points={"console_scripts": ["tpo-lite=tpo_lite.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Benchmarks (not tests). ``kernels``: the fused log-prob op against eager / compiled PyTorch, Liger-Kernel and
the bare matrix-product floor; run it with ``tpo-lite bench kernels``."""
from .kernels import KernelBenchConfig, format_table, run_kernel_benchmark

__all__ = ["KernelBenchConfig", "format_table", "run_kernel_benchmark"]

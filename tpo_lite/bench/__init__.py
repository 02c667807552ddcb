"""Benchmarks (not tests). ``kernels``: the fused log-prob op against eager / compiled PyTorch, Liger-Kernel and
the bare matrix-product floor; run it with ``tpo-lite bench kernels``. ``sampling``, ``train`` and
``precision`` (DPO step time per base precision): see their modules. Importing this package loads no benchmark
(``tpo-lite bench ... --help`` stays fast)."""

__all__ = ["KernelBenchConfig", "format_table", "run_kernel_benchmark"]


def __getattr__(name):
    # The kernel benchmark's names, re-exported on first use.
    if name in __all__:
        from . import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

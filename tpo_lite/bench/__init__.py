"""Benchmarks (not tests). ``kernels``: the fused log-prob op against eager / compiled PyTorch, Liger-Kernel and
the bare matrix-product floor; run it with ``tpo-lite bench kernels``. ``sampling``, ``train`` and
``precision`` (DPO step time per base precision): see their modules. Importing this package loads no benchmark
(``tpo-lite bench ... --help`` stays fast)."""

import contextlib

__all__ = ["KernelBenchConfig", "format_table", "run_kernel_benchmark"]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside (``n`` <= 0: left as it is) and restored after: a
    benchmark called in-process must not change its caller's thread count, since a later computation with another
    count can differ in its last bits (a run that should repeat another byte for byte would not)."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def __getattr__(name):
    # The kernel benchmark's names, re-exported on first use.
    if name in __all__:
        from . import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Finds the compiled kernels: the pip-built extension, else a JIT build, else None (callers fall back).

Order for the CPU kernels: ``tpo_lite._C`` (built by ``pip install .``), then a JIT compile of
``csrc/cpu/*.cpp`` with ``torch.utils.cpp_extension.load`` (ninja; cached in ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/tpo_lite/torch_extensions``, so only the first call pays for the compile), else ``None``, after
which the ops use the pure-PyTorch reference and this module emits one warning saying why and what fixes it.
The CUDA kernels (``tpo_lite._C_cuda``, ``csrc/cuda/``) are found the same way; without nvcc there is no JIT
attempt. The sources are those of the installed package (``tpo_lite/csrc``, shipped in the sdist and wheel),
else the checkout's ``csrc/`` (:func:`source_dir`). Set ``TPO_LITE_NO_JIT=1`` to skip the JIT step.
"""
from __future__ import annotations

import glob
import os
import threading
import warnings
from types import ModuleType
from typing import Dict, Optional

_lock = threading.Lock()
_cache: Dict[str, Optional[ModuleType]] = {}
_warned: Dict[str, bool] = {}

# Both the setup.py build and the JIT build use these; target_clones in the sources picks the ISA at load
# time, so no -march flag is needed.
CPU_CFLAGS = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 for torch 2.13)
CPU_LDFLAGS = ["-fopenmp"]


class ExtensionUnavailable(RuntimeError):
    """Raised by :func:`require` when no compiled kernel could be loaded."""


def _build_dir(name: str) -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tpo_lite", "torch_extensions"
    )
    import torch

    path = os.path.join(root, f"{name}_torch{torch.__version__.replace('+', '_')}")
    os.makedirs(path, exist_ok=True)
    return path


def _jit(name: str, sources: list, cuda: bool) -> ModuleType:
    from torch.utils import cpp_extension

    kwargs = dict(
        name=name,
        sources=sources,
        extra_cflags=CPU_CFLAGS,
        extra_ldflags=CPU_LDFLAGS,
        build_directory=_build_dir(name),
        verbose=bool(os.environ.get("TPO_LITE_VERBOSE_BUILD")),
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3"]  # no fast-math: the kernels rely on accurate exp/expm1 for +-1e4 logits
    return cpp_extension.load(**kwargs)


def source_dir() -> Optional[str]:
    """The kernel sources the JIT compiles: the installed package's ``tpo_lite/csrc``, else the checkout's
    ``csrc/``; None when neither is there."""
    from ..packaged import packaged_dir

    path = packaged_dir("csrc")
    return str(path) if path is not None else None


def _cuda_home() -> Optional[str]:
    """torch's CUDA toolkit root (CUDA_HOME / CUDA_PATH, else nvcc's on PATH, else /usr/local/cuda if it exists);
    None without one (always None for a CPU-only torch)."""
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _no_nvcc_fix() -> str:
    import torch

    return (f"Fix: install the CUDA toolkit (nvcc) for torch's CUDA {torch.version.cuda}, set CUDA_HOME to it "
            "(e.g. /usr/local/cuda) and reinstall with `pip install --no-build-isolation .` (or just start "
            "again: the kernels then JIT-compile on first use), or install a tpo-lite wheel built with CUDA for "
            "this torch.")


def _load(kind: str) -> Optional[ModuleType]:
    """kind: 'cpu' or 'cuda'. Returns the module or None (after one warning)."""
    modname, subdir = ("_C", "cpu") if kind == "cpu" else ("_C_cuda", "cuda")
    try:
        import importlib

        return importlib.import_module(f"tpo_lite.{modname}")
    except ImportError as e:
        import_error = e
    reason = f"tpo_lite.{modname} is not built ({import_error})"
    fix = "Build it with `pip install --no-build-isolation .`."
    if os.environ.get("TPO_LITE_NO_JIT"):
        reason += "; JIT compile disabled by TPO_LITE_NO_JIT"
    elif kind == "cuda" and _cuda_home() is None:
        # without nvcc a JIT attempt can only fail (after importing the whole toolchain); say what is missing
        reason += "; no CUDA compiler to JIT-compile it: nvcc was not found (CUDA_HOME is not set, nvcc not on PATH)"
        fix = _no_nvcc_fix()
    else:
        pattern = ("*.cpp",) if kind == "cpu" else ("*.cu", "*.cpp")
        root = source_dir()
        sources = sorted(s for p in pattern for s in glob.glob(os.path.join(root, subdir, p))) if root else []
        if not sources:
            reason += ("; no sources to JIT-compile (neither tpo_lite/csrc in the installed package nor csrc/ "
                       f"in a checkout has {subdir}/{'|'.join(pattern)})")
            fix = "Reinstall tpo-lite from its sdist or wheel (they carry the sources)."
        else:
            try:
                return _jit(f"tpo_lite{modname}", sources, cuda=(kind == "cuda"))
            except Exception as e:  # compiler missing, build error, ...: fall back, but say why
                reason += f"; JIT compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    if not _warned.get(kind):
        _warned[kind] = True
        warnings.warn(
            f"tpo_lite: {reason}. Falling back to the pure-PyTorch reference for the {kind.upper()} fused ops "
            f"(correct but materialises the N x V logits: slow and memory-hungry). {fix}",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def get_extension(kind: str = "cpu") -> Optional[ModuleType]:
    """The kernel module for 'cpu' or 'cuda', loading (and if needed compiling) it on first use; None if absent.

    Thread-safe and cached: the import / compile is attempted once per process.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"get_extension: kind must be 'cpu' or 'cuda', got {kind!r}")
    if kind in _cache:
        return _cache[kind]
    with _lock:
        if kind not in _cache:
            _cache[kind] = _load(kind)
    return _cache[kind]


def require(kind: str = "cpu") -> ModuleType:
    """Like :func:`get_extension` but raises :class:`ExtensionUnavailable` instead of returning None."""
    mod = get_extension(kind)
    if mod is None:
        raise ExtensionUnavailable(f"tpo_lite: the {kind} kernel extension is unavailable (see the warning above)")
    return mod

"""What a measured number depends on besides the code: the machine and the library versions.

Greedy outputs of the same commit differ between machines: ``model.dtype = "auto"`` is bf16 on a CPU with
AVX-512-bf16/AMX and fp32 elsewhere, and oneDNN/ATen pick their matrix-product kernels by the CPU's vector
extensions, which changes float rounding and so, now and then, a greedy token. (Measured: the same commit
scored the SmolLM2 seed 0.146 on an AVX-512-bf16 EPYC and 0.118 on another machine.) Every result file of a
run therefore records :func:`environment`, and two results are comparable token for token only when their
``environment`` matches.
"""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

# CPU flags that change which kernels (and so which float rounding) torch uses on the CPU.
_KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "fma")


def _cpu() -> dict:
    model, flags = platform.processor() or "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "kernel_flags": [f for f in _KERNEL_FLAGS if f in flags]}


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + ("+dirty" if dirty.stdout.strip() else "")) if commit else None


def environment(device: str | None = None, dtype: str | None = None) -> dict:
    """The machine and software a result was produced on (JSON-ready).

    ``device`` / ``dtype``: the model's resolved device and weight dtype, when known (``"auto"`` resolves
    differently per machine, so the resolved value is what matters).
    """
    import torch
    import transformers

    env = {
        "tpo_lite_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: a TorchVersion would need torch to unpickle
        "transformers": transformers.__version__,
        "cpu": _cpu(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "os_cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["cuda"] = {"device": torch.cuda.get_device_name(0), "version": torch.version.cuda}
    if device is not None:
        env["device"] = str(device)
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    return env


def comparable(a: dict | None, b: dict | None) -> bool:
    """True when two recorded environments would give the same greedy tokens for the same commit and config
    (same CPU kernel features, resolved dtype, device and library versions)."""
    if not a or not b:
        return False
    keys = ("torch", "transformers", "torch_cpu_capability", "device", "dtype")
    return all(a.get(k) == b.get(k) for k in keys) and \
        (a.get("cpu") or {}).get("kernel_flags") == (b.get("cpu") or {}).get("kernel_flags")


def model_environment(model_cfg) -> dict:
    """:func:`environment` with the device and weight dtype that ``model_cfg`` (a ModelConfig) resolves to here
    (for a server backend this machine's resolution is recorded; the server's own is unknown)."""
    from .models import resolve_device, resolve_dtype

    device = resolve_device(model_cfg.device)
    return environment(device=device, dtype=resolve_dtype(model_cfg.dtype, device))

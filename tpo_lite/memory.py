"""Process memory: the peak RSS (and CUDA memory) of a stage, and handing freed memory back between stages.

Peak RSS of a stage: on Linux the kernel's high-water mark ``VmHWM`` is reset to the current RSS when the stage
starts (``/proc/self/clear_refs`` = 5) and read when it ends, so the peak covers every allocation however short.
Where that file is not writable, a thread samples ``VmRSS`` every 10 ms instead; without ``/proc`` only
``ru_maxrss`` (the process peak so far) is left. The method used is recorded with each measurement.

:func:`release` runs the garbage collector (a peft model sits in reference cycles, so ``del model`` alone does
not free it), empties the CUDA cache and asks glibc to return its free heap pages (``malloc_trim``): without
that, the pages a training step freed stay in the process and the next stage's peak lands on top of them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import threading
import time
from typing import Optional

_MB = 1024 * 1024
_lock = threading.Lock()
_peak_before_reset = 0  # the largest VmHWM seen before one of our resets (the process peak survives them)


def proc_kb(key: str, path: str = "/proc/self/status") -> Optional[int]:
    """The ``key: <n> kB`` field of a /proc file (``/proc/<pid>/status``, ``/proc/<pid>/smaps_rollup``), or None
    where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> Optional[int]:
    """Current resident set size, or None where ``/proc`` is missing."""
    kb = proc_kb("VmRSS")
    return None if kb is None else kb * 1024


def private_rss_bytes() -> Optional[int]:
    """The resident memory only this process holds (``RssAnon``: heap, stacks, anonymous maps; not the pages of
    files such as shared libraries, which a child process maps too), or None where ``/proc`` is missing."""
    kb = proc_kb("RssAnon")
    return None if kb is None else kb * 1024


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not let us."""
    global _peak_before_reset
    hwm = proc_kb("VmHWM")
    if hwm is None:
        return False
    with _lock:
        _peak_before_reset = max(_peak_before_reset, hwm * 1024)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def process_peak_bytes() -> int:
    """Peak RSS of this process since it started (also across the resets made by :class:`StageMemory`)."""
    hwm = proc_kb("VmHWM")
    return max(_peak_before_reset, hwm * 1024 if hwm is not None else 0, _maxrss_bytes())


def _cuda():
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch
    return None


_TRIM = []  # [glibc's malloc_trim or None], looked up once (find_library is slow)


def _trim_fn():
    if not _TRIM:
        fn = None
        try:
            name = ctypes.util.find_library("c")
            fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
        except OSError:
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_size_t]
        _TRIM.append(fn)
    return _TRIM[0]


def malloc_trim() -> bool:
    """Ask glibc to give its free heap pages back to the OS; False where there is no glibc."""
    fn = _trim_fn()
    if fn is None:
        return False
    fn(0)
    return True


def trim_during_passes(layers, every: int = 5) -> list:
    """Hooks that call :func:`malloc_trim` after every ``every``-th of ``layers`` (decoder layers) in the forward
    and before its backward; returns the hook handles (``.remove()`` them to undo). Nothing where there is no glibc.

    glibc keeps the pages of freed activations (above its mmap threshold, which it raises as big blocks are freed),
    and the interleaved long-lived tensors of a forward keep it from reusing them: on SmolLM2-135M (bf16, CPU,
    gradient checkpointing, 4 x 512 tokens) the forward grew RSS by ~0.9 GB that no tensor used. Trimming every 5
    layers keeps the step's peak near what is alive, for a few % more time (the pages are faulted in again).
    """
    if _trim_fn() is None or every < 1:
        return []

    def after_forward(module, args, output):
        malloc_trim()
        out = output[0] if isinstance(output, (tuple, list)) else output
        if getattr(out, "requires_grad", False):
            out.register_hook(_trim_before_backward)

    return [layer.register_forward_hook(after_forward) for i, layer in enumerate(layers) if i % every == every - 1]


def _trim_before_backward(grad):
    malloc_trim()
    return None


def release() -> None:
    """Free what the last stage left unreferenced: cycles (gc), the CUDA cache, glibc's free pages."""
    gc.collect()
    torch = _cuda()
    if torch is not None:
        torch.cuda.empty_cache()
    malloc_trim()


class StageMemory:
    """Measure the peak memory of a block: ``with StageMemory() as m: ...``; then ``m.record()``.

    ``record()`` may be called inside the block too (the peak so far). With ``release_after`` (default) the
    block's garbage is freed on exit (:func:`release`) and ``rss_end_mb`` is the RSS after that.
    """

    active: Optional["StageMemory"] = None  # the innermost measured block (read by rundir.IterationDir.mark_done)

    def __init__(self, release_after: bool = True, interval_s: float = 0.01):
        self.release_after = release_after
        self.interval_s = interval_s
        self.method = ""
        self._start = self._end = None
        self._sampled = 0
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._outer: Optional[StageMemory] = None
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._final: Optional[dict] = None
        self._carry = 0  # this block's peak before a nested block reset the counters
        self._cuda_carry = (0, 0)

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            r = rss_bytes() or 0
            if r > self._sampled:
                self._sampled = r

    def __enter__(self):
        outer = StageMemory.active
        while outer is not None:  # a nested block resets the counters: keep every enclosing block's peak so far
            outer._carry = max(outer._carry, outer._peak())
            outer._cuda_carry = outer._cuda_peaks()
            outer = outer._outer
        self._start = rss_bytes()
        self._t0 = time.time()
        self._cpu0 = time.process_time()
        if self._start is not None and _reset_hwm():
            self.method = "VmHWM reset at the start (/proc/self/clear_refs)"
        elif self._start is not None:
            self.method = "VmRSS sampled every 10 ms"
            self._sampled = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.method = "ru_maxrss (process peak so far)"
        torch = _cuda()
        if torch is not None:
            torch.cuda.reset_peak_memory_stats()
        self._outer, StageMemory.active = StageMemory.active, self
        return self

    def _peak(self) -> int:
        if self._thread is not None:
            return max(self._sampled, rss_bytes() or 0)
        if self.method.startswith("VmHWM"):
            return max(self._carry, (proc_kb("VmHWM") or 0) * 1024)
        return _maxrss_bytes()

    def _cuda_peaks(self) -> tuple[int, int]:
        torch = _cuda()
        if torch is None:
            return self._cuda_carry
        return (max(self._cuda_carry[0], torch.cuda.max_memory_allocated()),
                max(self._cuda_carry[1], torch.cuda.max_memory_reserved()))

    def record(self) -> dict:
        """``peak_rss_mb``, ``rss_start_mb``, ``rss_end_mb`` (after the exit's release; absent inside the
        block), ``seconds``, ``cpu_seconds`` (of the whole process, all threads), on CUDA
        ``peak_cuda_allocated_mb`` / ``peak_cuda_reserved_mb``, and ``method``."""
        if self._final is not None:
            return dict(self._final)
        out = {"peak_rss_mb": round(self._peak() / _MB, 1),
               "rss_start_mb": None if self._start is None else round(self._start / _MB, 1),
               "seconds": round(time.time() - self._t0, 2),
               "cpu_seconds": round(time.process_time() - self._cpu0, 2), "method": self.method}
        if _cuda() is not None:
            alloc, reserved = self._cuda_peaks()
            out["peak_cuda_allocated_mb"] = round(alloc / _MB, 1)
            out["peak_cuda_reserved_mb"] = round(reserved / _MB, 1)
        return out

    def start(self) -> "StageMemory":
        """``with`` without a block: ``m = StageMemory().start()`` ... ``m.stop()``."""
        return self.__enter__()

    def stop(self) -> dict:
        self.__exit__(None, None, None)
        return self.record()

    def __exit__(self, *exc):
        final = self.record()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        StageMemory.active = self._outer
        if self.release_after:
            release()
        end = rss_bytes()
        final["rss_end_mb"] = None if end is None else round(end / _MB, 1)
        self._final = final
        return False

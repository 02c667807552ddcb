"""Kernel benchmark: the fused linear log-prob op against the alternatives, fwd+bwd, side by side in one run.

Methods (each one training step with a frozen LM head: per-token log-probs, sum, backward to the hidden states):

- ``fused``: :func:`tpo_lite.ops.fused_linear_logprobs` (the C++/CUDA kernels; the PyTorch reference until they
  are built, which the JSON records under ``meta.fused_impl``).
- ``eager``: plain PyTorch, ``logits = h @ W^T`` -> ``log_softmax`` (fp32) -> ``gather``.
- ``compiled``: ``torch.compile`` of ``eager`` (compiled during the warm-up, not timed).
- ``liger``: Liger-Kernel's fused linear cross-entropy (``reduction="sum"``, i.e. minus the summed log-probs);
  only on a GPU with ``liger_kernel`` importable, otherwise reported as ``"n/a (why)"``.
- ``floor``: the bare two N x d x V matrix products a frozen-head step cannot avoid (``L = h W^T``, ``L W``),
  without any softmax; the fused op's target is to come close to it.

Timing: every method is warmed up, then the methods are run interleaved ``repeats`` times (method order
rotates each round so no method always runs right after the same neighbour) and the median is reported.

Peak memory (``peak_extra_bytes``, memory above the inputs):
- CUDA: ``torch.cuda.max_memory_allocated`` during one step, minus what was allocated before it.
- CPU: each (case, method) runs in a fresh Python subprocess: inputs are built, one warm-up step runs (library
  initialisation, torch.compile), then the kernel's resident-set high-water mark is reset
  (``/proc/self/clear_refs`` = 5) and one step runs; the reported number is ``VmHWM - VmRSS`` around that step.
  glibc is told to serve every allocation over 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed warm-up
  buffers go back to the kernel and the measured step has to fault its memory in again. Where ``clear_refs`` is
  not writable, the fallback is the ``ru_maxrss`` growth over the first step (no warm-up; includes one-time
  initialisation), and ``meta.memory_method`` says so.

Ratios (``ratios``) are quotients of the medians / peaks above: ``fused/eager`` < 1 means fused is faster.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from ..options import option

# torch is imported inside the functions that run: `tpo-lite bench kernels --help` must not load it.
METHODS = ("fused", "eager", "compiled", "liger", "floor")
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names
# The full grid of the issue; the GPU default.
GPU_SHAPES = [(n, d, v) for n in (1024, 4096) for d in (576, 896, 2048) for v in (49152, 151936, 262144)]
# CPU default: the target case of the issue (N=2048, d=896, V=151936; fp32 and bf16), which fits in memory
# (eager holds a few N x V fp32 buffers, ~1.2 GB each) and runs in a few minutes on a few cores.
CPU_SHAPES = [(2048, 896, 151936)]


@dataclass
class KernelBenchConfig:
    device: str = option("auto", "cpu, cuda, or auto (cuda when available).")
    shapes: Optional[List[Tuple[int, int, int]]] = option(None,
        "Cases as N,d,V triples (tokens, hidden size, vocab). Default: on the GPU the grid "
        "N in {1024,4096} x d in {576,896,2048} x V in {49152,151936,262144}; on the CPU "
        "2048,896,151936.")
    dtypes: List[str] = option(factory=lambda: ["float32", "bfloat16"], help=
        "Input dtypes to run every shape in: float32, bfloat16, float16.")
    methods: List[str] = option(factory=lambda: list(METHODS), help=
        "Methods to compare: fused, eager, compiled (torch.compile of eager), liger "
        "(Liger-Kernel, GPU only), floor (the two bare matrix products).")
    repeats: int = option(5,
        "Timed fwd+bwd runs per method (interleaved); the median "
        "is reported. At least 1; use >= 5 for numbers you report.")
    warmup: int = option(1,
        "Untimed runs per method before timing (torch.compile "
        "compiles in the first).")
    memory: bool = option(True,
        "Measure peak extra memory per method (CPU: one fresh "
        "subprocess per case and method).")
    threads: int = option(0, "torch CPU threads (0: torch's default).")
    seed: int = option(0, "Seed for the random inputs.")
    floor_max_bytes: int = option(4 << 30,
        "The floor materialises the N x V product when it is at most this many bytes; above "
        "it the two products run over 16384-column vocab chunks (same FLOPs).")
    child_timeout_s: float = option(900.0, "Time limit of one CPU memory subprocess.")

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be cpu, cuda or auto, got {self.device!r}")
        for name in self.dtypes:
            if name not in DTYPES:
                raise ValueError(f"dtypes: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
        for name in self.methods:
            if name not in METHODS:
                raise ValueError(f"methods: unknown method {name!r} (choose from {', '.join(METHODS)})")
        if "fused" not in self.methods:
            raise ValueError("methods: must include fused (every ratio is relative to it)")
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.shapes is not None:
            shapes = []
            for s in self.shapes:
                if len(s) != 3 or any(int(x) <= 0 for x in s):
                    raise ValueError(f"shapes: each case must be three positive integers N,d,V, got {s!r}")
                shapes.append(tuple(int(x) for x in s))
            self.shapes = shapes


def parse_shapes(text: str) -> List[Tuple[int, int, int]]:
    """'2048,896,151936;1024,576,49152' -> [(2048, 896, 151936), (1024, 576, 49152)]."""
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        items = part.lower().replace("x", ",").split(",")
        try:
            values = tuple(int(x) for x in items)
        except ValueError:
            raise ValueError(f"shapes: {part!r} is not N,d,V (three integers)") from None
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"shapes: {part!r} is not N,d,V (three positive integers)")
        shapes.append(values)
    if not shapes:
        raise ValueError(f"shapes: no N,d,V triple in {text!r}")
    return shapes


class Unavailable(Exception):
    """A method that cannot run here; the message says why (it ends up as "n/a (why)")."""


# --------------------------------------------------------------------------------------------------- steps


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int):
    """Hidden [n,d] (requires grad), frozen head [v,d], targets [n]; logits have a std of about 2."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) * (2.0 / math.sqrt(d))).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, targets


def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch way: logits -> log_softmax (fp32) -> gather."""
    import torch
    logits = (hidden @ weight.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def fused_impl_name() -> str:
    """What ``tpo_lite.ops.fused_linear_logprobs`` runs on this install (the JSON records it)."""
    from tpo_lite import ops

    if ops.fused_linear_logprobs is ops.linear_logprobs_reference:
        return "reference (tpo_lite.ops.linear_logprobs not available)"
    return f"{ops.fused_linear_logprobs.__module__}.{ops.fused_linear_logprobs.__name__}"


FLOOR_CHUNK = 16384  # vocab columns per product when the floor may not materialise N x V


def _floor_chunk(n: int, v: int, elem: int, max_bytes: int) -> int:
    return v if n * v * elem <= max_bytes else FLOOR_CHUNK


def build_step(method: str, hidden, weight, targets, cfg: KernelBenchConfig) -> Callable[[], None]:
    """One training step of `method` (fwd + bwd into hidden.grad; the floor returns its [N, d] product instead);
    raises Unavailable when the method cannot run here."""
    import torch
    if method == "fused":
        from tpo_lite.ops import fused_linear_logprobs

        def step():
            hidden.grad = None
            fused_linear_logprobs(hidden, weight, targets).sum().backward()

        return step
    if method == "eager":

        def step():
            hidden.grad = None
            eager_logprobs(hidden, weight, targets).sum().backward()

        return step
    if method == "compiled":
        try:
            # Fresh dynamo state per case: the compiled-code cache lives on eager_logprobs' code object, and
            # after torch._dynamo.config.cache_size_limit shapes dynamo would silently run eager instead.
            torch._dynamo.reset()
            compiled = torch.compile(eager_logprobs, dynamic=False)
        except Exception as e:  # e.g. no C++ compiler for inductor
            raise Unavailable(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

        def step():
            hidden.grad = None
            compiled(hidden, weight, targets).sum().backward()

        return step
    if method == "liger":
        if hidden.device.type != "cuda":
            raise Unavailable("Liger-Kernel needs a GPU (Triton)")
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as e:
            raise Unavailable(f"liger_kernel not importable: {type(e).__name__}")
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step():
            hidden.grad = None
            loss_fn(weight, hidden, targets).backward()

        return step
    if method == "floor":
        n, v = hidden.shape[0], weight.shape[0]
        chunk = _floor_chunk(n, v, hidden.element_size(), cfg.floor_max_bytes)
        h = hidden.detach()

        def step():
            # The same two products the frozen-head step needs: logits, then (scores) @ W into [n, d].
            out = None
            for v0 in range(0, v, chunk):
                w = weight[v0:v0 + chunk]
                prod = (h @ w.t()) @ w
                out = prod if out is None else out.add_(prod)
            return out

        return step
    raise ValueError(f"unknown method {method!r}")


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(step: Callable[[], None], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


def memory_method(device: str) -> str:
    if device == "cuda":
        return "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
    if sys.platform.startswith("linux") and _can_reset_hwm():
        return ("fresh subprocess per case/method; after one warm-up step: VmHWM reset via /proc/self/clear_refs, "
                "peak = VmHWM - VmRSS over one step (MALLOC_MMAP_THRESHOLD_=131072)")
    return "fresh subprocess per case/method; ru_maxrss growth over the first step (no warm-up)"


def _memory_child(spec: dict) -> dict:
    """Runs in the subprocess: one case, one method -> {"peak_extra_bytes": int} or {"error": str}."""
    import torch
    import resource

    cfg = KernelBenchConfig(**spec["cfg"])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    n, d, v = spec["shape"]
    hidden, weight, targets = make_inputs(n, d, v, getattr(torch, spec["dtype"]), "cpu", cfg.seed)
    try:
        step = build_step(spec["method"], hidden, weight, targets, cfg)
    except Unavailable as e:
        return {"error": f"n/a ({e})"}
    if _can_reset_hwm():
        step()  # warm-up: library init, oneDNN primitives, torch.compile
        hidden.grad = None
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        step()
        peak = _proc_status_kb("VmHWM")
        return {"peak_extra_bytes": max(0, peak - base) * 1024}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_bytes": max(0, peak - base) * 1024}


def _measure_memory_cpu(shape, dtype: str, method: str, cfg: KernelBenchConfig) -> dict:
    spec = {"cfg": dataclasses.asdict(cfg), "shape": list(shape), "dtype": dtype, "method": method}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, "-m", "tpo_lite.bench.kernels", "--memory-child", json.dumps(spec)],
        capture_output=True, text=True, timeout=cfg.child_timeout_s, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"memory subprocess failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def _measure_memory_cuda(step: Callable[[], None], hidden: torch.Tensor) -> dict:
    import torch
    hidden.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    hidden.grad = None
    return {"peak_extra_bytes": int(peak - base)}


# --------------------------------------------------------------------------------------------------- driver


def _device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def _ratios(methods: Dict[str, dict]) -> Dict[str, float]:
    ratios = {}
    fused = methods.get("fused", {})
    for other in ("eager", "compiled", "liger", "floor"):
        o = methods.get(other, {})
        if fused.get("status") == "ok" and o.get("status") == "ok":
            ratios[f"fused/{other}"] = fused["median_ms"] / o["median_ms"]
            if fused.get("peak_extra_bytes") and o.get("peak_extra_bytes") and other != "floor":
                ratios[f"mem fused/{other}"] = fused["peak_extra_bytes"] / o["peak_extra_bytes"]
    return ratios


def run_case(shape, dtype_name: str, device: str, cfg: KernelBenchConfig, log: Callable[[str], None]) -> dict:
    """Times (and measures memory of) every method on one (N, d, V, dtype) case."""
    import torch
    n, d, v = shape
    hidden, weight, targets = make_inputs(n, d, v, getattr(torch, dtype_name), device, cfg.seed)
    methods: Dict[str, dict] = {}
    steps: Dict[str, Callable[[], None]] = {}
    for m in cfg.methods:
        try:
            steps[m] = build_step(m, hidden, weight, targets, cfg)
            for _ in range(cfg.warmup):
                steps[m]()
            methods[m] = {"status": "ok", "times_ms": []}
        except Unavailable as e:
            methods[m] = {"status": f"n/a ({e})"}
            steps.pop(m, None)
        except Exception as e:  # an OOM or a compile error in one method must not sink the whole run
            methods[m] = {"status": f"n/a (failed: {type(e).__name__}: {str(e).splitlines()[0][:150]})"}
            steps.pop(m, None)
    order = list(steps)
    for r in range(cfg.repeats):
        rot = order[r % len(order):] + order[: r % len(order)] if order else []
        for m in rot:
            try:
                methods[m]["times_ms"].append(_time_once(steps[m], device))
            except Exception as e:  # e.g. out of memory on a later, larger allocation
                methods[m] = {"status": f"n/a (failed: {type(e).__name__}: {str(e).splitlines()[0][:150]})"}
                order.remove(m)
                del steps[m]
                hidden.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    for m in order:
        methods[m]["median_ms"] = statistics.median(methods[m]["times_ms"])
    if "floor" in steps:
        methods["floor"]["chunk"] = _floor_chunk(n, v, hidden.element_size(), cfg.floor_max_bytes)

    # Accuracy of the fused op against eager on these inputs (information, not a test).
    accuracy = None
    if "fused" in steps and "eager" in steps:
        with torch.no_grad():
            from tpo_lite.ops import fused_linear_logprobs

            diff = (fused_linear_logprobs(hidden, weight, targets).float() - eager_logprobs(hidden, weight, targets))
            accuracy = float(diff.abs().max())

    if cfg.memory:
        for m in order:
            if device == "cuda":
                mem = _measure_memory_cuda(steps[m], hidden)
            else:
                mem = _measure_memory_cpu(shape, dtype_name, m, cfg)
            if "peak_extra_bytes" in mem:
                methods[m]["peak_extra_bytes"] = mem["peak_extra_bytes"]
            else:
                methods[m]["memory_error"] = mem.get("error", "unknown")
    del steps, hidden, weight, targets
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    case = {"N": n, "d": d, "V": v, "dtype": dtype_name, "methods": methods, "ratios": _ratios(methods),
            "max_abs_diff_fused_vs_eager": accuracy}
    log(format_case_line(case))
    return case


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
    return device


def run_kernel_benchmark(cfg: KernelBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Runs every (shape, dtype) case of `cfg` and returns the result dict (the JSON written by the CLI); with
    ``cfg.threads`` torch's thread count for the benchmark only."""
    from . import torch_threads

    with torch_threads(cfg.threads):
        return _run_kernel_benchmark(cfg, log)


def _run_kernel_benchmark(cfg: KernelBenchConfig, log: Callable[[str], None]) -> dict:
    import torch
    device = resolve_device(cfg.device)
    shapes = cfg.shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    meta = {
        "device": device,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "fused_impl": fused_impl_name(),
        "memory_method": memory_method(device) if cfg.memory else None,
        "step": "per-token log-probs of all N tokens (frozen head), sum, backward to hidden; medians in ms",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": dataclasses.asdict(cfg),
    }
    cases = [run_case(s, dt, device, cfg, log) for s in shapes for dt in cfg.dtypes]
    return {"meta": meta, "cases": cases}


# --------------------------------------------------------------------------------------------------- output


def _fmt_ms(m: dict) -> str:
    return f"{m['median_ms']:.1f}" if m.get("status") == "ok" else "n/a"


def _fmt_mb(m: dict) -> str:
    return f"{m['peak_extra_bytes'] / 2**20:.0f}" if "peak_extra_bytes" in m else "-"


def format_case_line(case: dict) -> str:
    ms = case["methods"]
    parts = [f"N={case['N']} d={case['d']} V={case['V']} {case['dtype']}:"]
    parts += [f"{k} {_fmt_ms(v)} ms" for k, v in ms.items()]
    parts += [f"{k} {v:.3f}" for k, v in case["ratios"].items()]
    return " ".join(parts)


def format_table(result: dict) -> str:
    """A fixed-width table of the result: medians (ms), peak extra memory (MiB) and the ratios."""
    cases = result["cases"]
    methods = [m for m in METHODS if any(m in c["methods"] for c in cases)]
    head = ["N", "d", "V", "dtype"] + [f"{m} ms" for m in methods] + [f"{m} MiB" for m in methods]
    ratio_keys = sorted({k for c in cases for k in c["ratios"]}, key=lambda k: (k.startswith("mem"), k))
    head += ratio_keys
    rows = []
    for c in cases:
        ms = c["methods"]
        row = [str(c["N"]), str(c["d"]), str(c["V"]), c["dtype"]]
        row += [_fmt_ms(ms[m]) if m in ms else "-" for m in methods]
        row += [_fmt_mb(ms[m]) if m in ms else "-" for m in methods]
        row += [f"{c['ratios'][k]:.3f}" if k in c["ratios"] else "-" for k in ratio_keys]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
    notes = sorted({f"{m}: {v['status']}" for c in cases for m, v in c["methods"].items() if v["status"] != "ok"})
    meta = result["meta"]
    lines.append(f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
                 f"{meta['threads']} threads, median of {meta['repeats']}; fused = {meta['fused_impl']}")
    if meta.get("memory_method"):
        lines.append(f"memory: {meta['memory_method']}")
    lines += notes
    return "\n".join(lines)



if __name__ == "__main__":  # the CPU memory subprocess: python -m tpo_lite.bench.kernels --memory-child SPEC
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        print(json.dumps(_memory_child(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit("usage: tpo-lite bench kernels --help (this module's __main__ is the memory subprocess)")

"""Run one stage of a run in a fresh process, so that what it used is the operating system's again when it ends.

Why: in one process each stage's peak lands on top of what the stages before it left. glibc keeps the partly
used pages of a grown heap (``malloc_trim`` hands back only whole free pages): on the default run the stage
starts climbed 625 -> 1248 -> 1293 MB with no model alive, and the final held-out eval peaked at 1.82x the DPO
stage's peak (docs/training.md, "Memory of a whole run"). A stage in its own process starts from a clean heap,
and its exit frees everything, a CUDA context and cache included. The driver that starts the stages imports
neither torch nor transformers (the configs it reads are torch-free), so it adds tens of MB, not hundreds.

The child is a new interpreter (``python -c``, the same executable, environment, working directory and
``sys.path``), never a ``fork``: a process that has started OpenMP or CUDA threads cannot be forked safely. Unlike
multiprocessing's ``spawn`` it does not re-run the caller's ``__main__``, so a script that calls
:func:`tpo_lite.loop.run` at top level needs no ``if __name__ == "__main__"`` guard. The function and its
arguments are pickled (module-level, picklable); callables the stage reports through (``echo``, ``on_step``) are
named in ``forward``: the child gets stand-ins that send each call back over a pipe, and this process makes it as
it arrives (progress lines and tracker steps appear live, in order). An exception in the child is raised here
again, its traceback attached as a note; a child that dies without a result (killed, out of memory) is a
:class:`~tpo_lite.errors.TpoError` that names it. On Linux the child dies with this process
(``PR_SET_PDEATHSIG``), so a killed run leaves no stage writing behind it and resumes exactly as an in-process
run does.

A process that decodes on the CPU can also be given a fixed glibc mmap threshold (``mmap_threshold``): see
:func:`set_mmap_threshold`.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import traceback
from typing import Any, BinaryIO, Callable

from .errors import TpoError

_RESULT, _ERROR = "__result__", "__error__"
_HEADER = struct.Struct("<Q")
_BOOT = ("import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
         "from tpo_lite.stage_process import _child_main; _child_main()")


def _send(out: BinaryIO, message) -> None:
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(blob)) + blob)
    out.flush()


def _receive(inp: BinaryIO):
    """The next message, or None at the end of the pipe (the child has exited or died)."""
    head = inp.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    blob = inp.read(n)
    return pickle.loads(blob) if len(blob) == n else None


class _Forward:
    """The child's stand-in for a parent callable: each call is sent back through the pipe."""

    def __init__(self, out: BinaryIO, name: str):
        self.out, self.name = out, name

    def __call__(self, *args):
        _send(self.out, (self.name, args))


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def set_mmap_threshold(nbytes: int) -> bool:
    """Have glibc serve every allocation of at least ``nbytes`` with its own mmap, given back at free; True if set.

    Why, for a process that decodes: the KV caches grow by one position per step, so each step frees tensors a
    little smaller than the ones it allocates next. glibc serves such sizes from its heap once its dynamic
    threshold has climbed (up to 32 MiB), and the freed holes are too small for the next batch: on the default
    run's 96-row batches the heap ended 1253 MB with 1033 MB of it free, and the generate stage peaked above the
    DPO stage. At 4 MiB the same decoding peaked 34% lower for ~17% more time (page faults on fresh mappings);
    the outputs are the same bytes (docs/training.md, "Memory of a whole run"). No-op (False) off glibc."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD; fixing it also stops the dynamic adjustment


def _child_main() -> None:
    parent_pid, out_fd, fn, args, kwargs, forwarded, measure, mmap_threshold = pickle.load(sys.stdin.buffer)
    _die_with_parent(parent_pid)
    if mmap_threshold:
        set_mmap_threshold(mmap_threshold)
    out = os.fdopen(out_fd, "wb")
    kwargs = dict(kwargs, **{name: _Forward(out, name) for name in forwarded})
    try:
        if measure:
            from .memory import StageMemory

            with StageMemory() as mem:
                result = fn(*args, **kwargs)
            result = (result, mem.record())
        else:
            result = fn(*args, **kwargs)
        _send(out, (_RESULT, result))
    except BaseException as e:  # noqa: BLE001 -- every failure goes back to the parent
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(e)
            pickle.loads(payload)
        except Exception:  # noqa: BLE001 -- an exception that does not survive pickling is sent as text
            payload = None
        _send(out, (_ERROR, (payload, f"{type(e).__name__}: {e}", tb)))
        out.close()
        os._exit(1)
    out.close()


def _raise_from_child(what: str, payload, text: str, tb: str):
    err = pickle.loads(payload) if payload is not None else RuntimeError(f"{what} failed: {text}")
    err.add_note(f"raised in the {what} process:\n{tb.rstrip()}")
    raise err


def _death(what: str, code: int | None) -> TpoError:
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        why = f"was killed by {sig}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    else:
        why = f"exited with status {code} without a result"
    return TpoError(f"the {what} process {why}; what it recorded is kept, run the same command again to resume")


def call_in_fresh_process(fn: Callable, *args, what: str, forward: dict[str, Callable | None] | None = None,
                          measure: bool = False, mmap_threshold: int | None = None, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in a fresh Python process; returns its result (``(result, StageMemory record)``
    with ``measure``). ``forward`` maps keyword names of ``fn`` to callables of this process (None = not
    passed); ``what`` names the stage in errors; ``mmap_threshold`` (bytes): :func:`set_mmap_threshold` in the
    child before ``fn`` runs."""
    forward = {k: v for k, v in (forward or {}).items() if v is not None}
    r, w = os.pipe()
    try:
        job = pickle.dumps((os.getpid(), w, fn, args, kwargs, tuple(forward), measure,  # fails here, not there
                            mmap_threshold))
        proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, pass_fds=(w,))
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    finished = False
    with os.fdopen(r, "rb") as inp:
        try:
            try:
                proc.stdin.write(pickle.dumps(list(sys.path)) + job)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died before reading its job: the end of the pipe below says how
            while True:
                message = _receive(inp)
                if message is None:
                    raise _death(what, proc.wait())
                name, payload = message
                if name == _RESULT:
                    finished = True
                    return payload
                if name == _ERROR:
                    finished = True
                    _raise_from_child(what, *payload)
                forward[name](*payload)
        finally:
            if not finished and proc.poll() is None:
                proc.kill()
            proc.wait()

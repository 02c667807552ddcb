"""Stages in fresh processes (tpo_lite.stage_process, loop.stage_processes): results, forwarded calls, errors and
deaths come back; the child dies with its parent; a run writes exactly what it writes in one process."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpo_lite.errors import TpoError
from tpo_lite.stage_process import call_in_fresh_process

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- functions the child runs (module level: pickled)

def five_mib_was_mmapped_after_a_20mib_free() -> bool | None:
    """Whether glibc served a 5 MiB allocation with its own mmap after a 20 MiB one was freed. Left to itself glibc
    raises its threshold past 20 MiB on that free (the 5 MiB then comes from the heap); with a fixed 4 MiB
    threshold it maps it. None where glibc's mallinfo2 is missing."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    mallinfo2.restype = Mallinfo2
    big = bytearray(20 << 20)
    del big
    before = mallinfo2().hblkhd
    small = bytearray(5 << 20)
    mapped = mallinfo2().hblkhd - before >= 5 << 20
    del small
    return mapped


def double_and_echo(x, echo=None, on_step=None):
    echo("first")
    if on_step is not None:
        on_step([{"step": 1}])
    echo("second")
    return os.getpid(), 2 * x


def raise_tpo_error():
    raise TpoError("bad value", path="cfg.toml", line=3, field="train.beta")


class _Unpicklable(Exception):
    def __init__(self):
        super().__init__("cannot travel")
        self.fn = lambda: None


def raise_unpicklable():
    raise _Unpicklable()


def die_by_sigkill(echo=None):
    echo("about to die")
    os.kill(os.getpid(), signal.SIGKILL)


def hold_memory(mb: int):
    block = bytearray(mb * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    return len(block)


def write_pid_and_sleep(path: str):
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


# ----------------------------------------------------------------------------------------------------- tests

def test_result_and_forwarded_calls_arrive_in_order():
    said, steps = [], []
    forward = {"echo": lambda s: said.append(("echo", s)), "on_step": lambda h: said.append(("step", h))}
    pid, y = call_in_fresh_process(double_and_echo, 21, what="test", forward=forward)
    assert y == 42 and pid != os.getpid()
    assert said == [("echo", "first"), ("step", [{"step": 1}]), ("echo", "second")]
    # a forward of None is not passed: the function's default applies
    _, y = call_in_fresh_process(double_and_echo, 1, what="test", forward={"echo": steps.append, "on_step": None})
    assert y == 2 and steps == ["first", "second"]


def test_an_error_is_raised_again_with_its_fields_and_the_child_traceback():
    with pytest.raises(TpoError) as e:
        call_in_fresh_process(raise_tpo_error, what="judge")
    err = e.value
    assert (err.message, err.path, err.line, err.field) == ("bad value", "cfg.toml", 3, "train.beta")
    assert str(err) == "cfg.toml:3: train.beta: bad value"
    note = "\n".join(err.__notes__)
    assert "raised in the judge process" in note and "raise_tpo_error" in note


def test_an_exception_that_cannot_be_pickled_comes_back_as_text():
    with pytest.raises(RuntimeError, match="test failed: _Unpicklable: cannot travel"):
        call_in_fresh_process(raise_unpicklable, what="test")


def test_a_killed_child_is_a_clear_error_after_what_it_said():
    said = []
    with pytest.raises(TpoError, match=r"the iteration 2 train process was killed by SIGKILL \(out of memory\?\)"):
        call_in_fresh_process(die_by_sigkill, what="iteration 2 train", forward={"echo": said.append})
    assert said == ["about to die"]


def test_measure_returns_the_child_peak():
    n, rec = call_in_fresh_process(hold_memory, 96, what="test", measure=True)
    assert n == 96 * 2**20
    assert rec["peak_rss_mb"] >= rec["rss_start_mb"] + 90, rec


def test_mmap_threshold_is_set_in_the_child_only():
    fixed = call_in_fresh_process(five_mib_was_mmapped_after_a_20mib_free, what="mmap", mmap_threshold=4 << 20)
    if fixed is None:
        pytest.skip("no glibc mallinfo2 here")
    assert fixed is True
    assert call_in_fresh_process(five_mib_was_mmapped_after_a_20mib_free, what="default") is False


def test_sampling_processes_get_the_threshold_only_with_the_local_backend():
    from tpo_lite.config import RunConfig
    from tpo_lite.loop import SAMPLING_MMAP_THRESHOLD, sampling_mmap_threshold

    cfg = RunConfig()
    assert cfg.sampling.backend == "local" and sampling_mmap_threshold(cfg) == SAMPLING_MMAP_THRESHOLD == 4 << 20
    assert sampling_mmap_threshold(cfg.replace("sampling", backend="server")) is None
    from tpo_lite.stages import STAGES

    assert [s.name for s in STAGES.values() if s.decodes] == ["generate"]  # the stage processes that get it


def test_an_unpicklable_argument_fails_before_a_process_starts():
    with pytest.raises((pickle.PicklingError, AttributeError)):
        call_in_fresh_process(double_and_echo, lambda: 1, what="test")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "child.pid"
    driver = (f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
              "from test_stage_process import write_pid_and_sleep\n"
              "from tpo_lite.stage_process import call_in_fresh_process\n"
              f"call_in_fresh_process(write_pid_and_sleep, {str(pid_file)!r}, what='sleeper')\n")
    parent = subprocess.Popen([sys.executable, "-c", driver], env=dict(os.environ, PYTHONPATH=str(TESTS.parent)))
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline and parent.poll() is None, "the child never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
            assert time.time() < deadline, "the stage process outlived its killed parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (OSError, IndexError):
        return "Z"


# ------------------------------------------------------------------------------------------ a whole run, twice

def _files(rd: Path) -> dict:
    """sha256 of every record file and adapter weight of a run (not the memory / timing records)."""
    out = {}
    for p in sorted(rd.rglob("*")):
        if p.is_file() and (p.suffix == ".jsonl" or p.name == "adapter_model.safetensors"):
            out[str(p.relative_to(rd))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


DRIVER = """
import json, sys
from tpo_lite.config import load_config
from tpo_lite.loop import run
cfg = load_config(sys.argv[1], sys.argv[2:])
logs = []
summary = run(cfg, progress=False, echo=logs.append)
print(json.dumps({"logs": logs, "summary": summary, "torch_in_driver": "torch" in sys.modules,
                  "transformers_in_driver": "transformers" in sys.modules}))
"""


@pytest.mark.slow  # two tiny runs, one of them in fresh processes per stage (~50 s)
def test_a_run_in_stage_processes_writes_what_one_process_writes(tmp_path):
    """A tiny random model whose generation config counts 60 common tokens as EOS, so that forced outputs end
    (valid), get different scores, make pairs and train: every stage that loads a model runs for real. The run
    in stage processes is driven from a fresh interpreter, to see what its driver imported."""
    from test_loop import _load, build_tiny_model, write_config, write_instructions
    from tpo_lite.loop import run

    model = build_tiny_model(tmp_path / "model")
    gc_path = model / "generation_config.json"
    gen = json.loads(gc_path.read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], *range(100, 160)]
    gc_path.write_text(json.dumps(gen))
    train = write_instructions(tmp_path / "train.jsonl", 10, "tr")
    heldout = write_instructions(tmp_path / "heldout.jsonl", 4, "ho")
    overrides = ["sampling.thought_budget=8", "sampling.max_new_tokens=24", "eval.max_new_tokens=16"]

    cfg_path = write_config(tmp_path, model, train, heldout, iterations=1, name="isolated")
    import torch

    # the same thread count in both runs: another count may change the last bits of a product
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent), OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", DRIVER, str(cfg_path), "loop.stage_processes=true", *overrides],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    isolated = json.loads(out.stdout.strip().splitlines()[-1])
    assert isolated["torch_in_driver"] is False and isolated["transformers_in_driver"] is False

    cfg = _load(write_config(tmp_path, model, train, heldout, iterations=1, name="inproc"), *overrides)
    assert cfg.loop.stage_processes is False
    logs: list[str] = []
    one = run(cfg, progress=False, echo=logs.append)

    a, b = _files(tmp_path / "runs" / "isolated"), _files(tmp_path / "runs" / "inproc")
    assert "iter_01/adapter/adapter_model.safetensors" in a, "no pairs were trained: the test lost its point"
    assert a == b
    lines = lambda logs: [s for s in logs if not s.startswith("iteration ")]  # noqa: E731 (the table has timings)
    assert [s.replace("inproc", "isolated") for s in lines(logs)] == lines(isolated["logs"])  # all came, in order
    iso, mem1 = isolated["summary"]["memory"], one["memory"]
    assert iso["stage_processes"] is True and mem1["stage_processes"] is False
    peaks = iso["stage_peak_rss_mb"]
    assert set(peaks) >= {"generate", "judge", "pairs", "train", "heldout", "eval_base"}
    assert iso["run_peak_rss_mb"] == max(iso["driver_peak_rss_mb"], *peaks.values())
    assert iso["run_peak_total_mb"] == pytest.approx(max(peaks.values()) + iso["driver_private_mb"], abs=0.11)
    # the driver never held a model (nor torch): far below any stage that did
    assert iso["driver_private_mb"] < 0.5 * peaks["train"], iso
    assert isolated["summary"]["heldout_after"]["mean_score"] == one["heldout_after"]["mean_score"]

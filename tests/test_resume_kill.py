"""Resume after a real ``kill -9`` of a running ``tpo-lite run`` process, at several points of the run.

The killed-and-resumed run must end with exactly the records of an uninterrupted run (the scripted sampler is
deterministic per sample seed, the programmatic judge and pair selection are deterministic) and never hold a
torn, duplicated or lost record on disk at any kill point.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_loop import build_tiny_model, write_config, write_instructions  # noqa: E402  (tests/ is on sys.path)

from tpo_lite.jsonl import read_records
from tpo_lite.rundir import RunDir

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Installed by sitecustomize in every interpreter a test run starts -- the `tpo-lite run` process and, with
# loop.stage_processes, each stage's process -- so all of them sample with the scripted sampler.
SITECUSTOMIZE = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import test_loop
import tpo_lite.loop as L
L.run_sampler = test_loop.scripted_factory(float(os.environ.get("TPO_TEST_DELAY", "0")))
"""
DRIVER = "import sys; from tpo_lite.cli import main; main(sys.argv[1:])"

KEYED = {"samples.jsonl": "prompt_id", "judgements.jsonl": "prompt_id", "outputs.jsonl": "id"}


def _start(cfg: Path, delay: float) -> subprocess.Popen:
    site = cfg.parent / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, TPO_TEST_DELAY=str(delay), PYTHONPATH=f"{site}{os.pathsep}{REPO}")
    return subprocess.Popen([sys.executable, "-c", DRIVER, "run", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO))


def _check_files(rd: Path) -> None:
    """No torn middle line, no duplicated key, in any JSONL of the run (a torn *last* line is allowed)."""
    for p in rd.rglob("*.jsonl"):
        if p.name in KEYED:
            read_records(p, key=KEYED[p.name])
        else:
            read_records(p)
    for p in rd.rglob("*.json"):
        json.loads(p.read_text())  # atomic writes: always whole


def _lines(p: Path) -> int:
    return p.read_bytes().count(b"\n") if p.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("stage_processes", [False, True], ids=["one-process", "stage-processes"])
def test_kill9_at_several_points_then_resume_equals_uninterrupted(tmp_path, stage_processes):
    """The uninterrupted reference runs in one process; the killed run in one process too, or with each stage in
    a process of its own (killed with the run's process), and must end with the same records either way."""
    model_dir = build_tiny_model(tmp_path / "model")
    train = write_instructions(tmp_path / "train.jsonl", 14, "tr")
    heldout = write_instructions(tmp_path / "heldout.jsonl", 4, "ho")
    ref_cfg = write_config(tmp_path, model_dir, train, heldout, name="ref")
    ref_dir = tmp_path / "runs" / "ref"
    # Uninterrupted reference run (same process type: the CLI in a subprocess).
    p = _start(ref_cfg, 0.0)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-3000:]

    (tmp_path / "k").mkdir()
    cfg = write_config(tmp_path / "k", model_dir, train, heldout, name="killed")
    if stage_processes:
        cfg.write_text(cfg.read_text().replace("stage_processes = false", "stage_processes = true"))
    rd = tmp_path / "k" / "runs" / "killed"
    it1, it2 = RunDir(rd).iteration(1), RunDir(rd).iteration(2)
    # Kill points: mid-sampling of iteration 1, right after its samples are complete (judging), after pairs
    # (training), mid-sampling of iteration 2, after iteration 2 trained (final held-out eval).
    points = [
        ("mid-generate 1", lambda: _lines(it1.samples) >= 2),
        ("judge 1", lambda: it1.is_done("generate")),
        ("train 1", lambda: it1.is_done("pairs")),
        ("mid-generate 2", lambda: _lines(it2.samples) >= 1),
        ("final eval", lambda: it2.is_done("train")),
    ]
    killed_at = []
    for label, cond in points:
        proc = _start(cfg, 0.4)
        deadline = time.time() + 300
        while not cond() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_at.append(label)
        proc.wait()
        proc.stdout.close()
        _check_files(rd)
    print("killed at:", killed_at)
    assert len(killed_at) >= 4, killed_at  # the run really was killed repeatedly
    proc = _start(cfg, 0.0)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    _check_files(rd)

    for t in (1, 2):
        a, b = RunDir(ref_dir).iteration(t), RunDir(rd).iteration(t)
        for name in ("samples", "judgements", "pairs", "pairs_trl", "plan"):
            assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes(), (t, name)
        ma, mb = json.loads(a.metrics.read_text()), json.loads(b.metrics.read_text())
        for sec in ("generate", "judge", "pairs"):
            assert {k: v for k, v in ma[sec].items()} == {k: v for k, v in mb[sec].items()}, (t, sec)
        da, db = ma["train"]["metrics"], mb["train"]["metrics"]
        for k, v in da.items():
            if isinstance(v, float) and "seconds" not in k:  # wall times differ, the numbers must not
                assert db[k] == pytest.approx(v, rel=1e-3, abs=1e-4), (t, k)
    ref_base = RunDir(ref_dir).eval_base.read_result()
    base = RunDir(rd).eval_base.read_result()
    assert base["items"] == ref_base["items"]  # greedy held-out eval of the seed model: identical
    assert "held-out" in out.decode()

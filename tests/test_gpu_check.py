"""scripts/gpu_check.sh as far as a machine without a GPU can run it: `--cpu` takes every step but the build
(the tiny model, CPU shapes) and must leave a summary whose steps all succeeded, with a kernel benchmark, an
NF4-or-bf16 DPO benchmark and an end-to-end run that really trained."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_summary_says_why_a_step_failed_and_keeps_a_partial_benchmark(tmp_path):
    """summary.json alone must say why a step failed (the machine and its log can be lost) and keep the runs of a
    benchmark cut short by its time limit."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check_summary
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.log").write_text("\n".join([
        "=== env (limit 60s): python -c ...", "torch 2.11", "=== env: exit 0 after 3s",
        "=== qlora_dpo (limit 180s): python -c ... bench train", "round 1/2: tpo-lite ...",
        *[f"line {i}" for i in range(20)], "  tpo-lite-shared: exit 1: RuntimeError: CUDA error",
        "=== qlora_dpo: timed out after 180s", "=== qlora_dpo: exit 124 after 190s",
        "=== run (limit 200s): python -c ... run", "ok", "=== run: exit 0 after 100s"]) + "\n")
    (out / "bench_train.json").write_text(json.dumps({
        "complete": False, "runs": [{"method": "tpo-lite"}], "ratios": {},
        "methods": {"tpo-lite": {"status": "ok", "tokens_per_s": 500.0}, "trl": {"status": "not run"}}}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("env\t0\t3\nbuild\tskipped: --cpu\t0\nqlora_dpo\t124\t190\nrun\t0\t100\n")
    gpu_check_summary.main([str(steps), str(out), "0", "m", "300"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["qlora_dpo"]
    by_name = {s["step"]: s for s in summary["steps"]}
    assert by_name["build"]["exit"] == "skipped: --cpu" and "log_tail" not in by_name["env"]
    tail = by_name["qlora_dpo"]["log_tail"]
    assert len(tail) == 12 and tail[-1] == "  tpo-lite-shared: exit 1: RuntimeError: CUDA error"
    assert not any(line.startswith("===") for line in tail)
    q = summary["qlora_dpo"]
    assert q["complete"] is False and q["runs"] == 1 and q["methods"]["tpo-lite"]["tokens_per_s"] == 500.0
    assert q["methods"]["trl"]["status"] == "not run"


@pytest.mark.slow
def test_gpu_check_cpu_plumbing(tmp_path):
    out = tmp_path / "out"
    # ~130 s on an idle 2-core CPU; the scale lets each step run 4x its GPU limit, so a CI runner busy with
    # other work does not time the plumbing out (what is tested here is the plumbing, not the speed)
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "400", "GPU_CHECK_TIME_SCALE": "4"}
    env.pop("GPU_CHECK_MODEL", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", str(out)], env=env,
                          capture_output=True, text=True, timeout=400 * 4 + 200)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [], log[-6000:]
    steps = {s["step"]: s["exit"] for s in summary["steps"]}
    for name in ("env", "tiny_model", "pytest_cuda", "kernels", "qlora_dpo", "run"):
        assert steps.get(name) == 0, (name, steps)
    assert str(steps["build"]).startswith("skipped")
    assert summary["kernels"][0]["status"]["fused"] == "ok"
    assert summary["qlora_dpo"]["methods"]["tpo-lite"]["status"] == "ok"
    assert summary["qlora_dpo"]["methods"]["tpo-lite"]["tokens_per_s"] > 0
    assert summary["qlora_dpo"]["complete"] is True
    run = summary["run"]
    assert run["iterations"] == 1 and run["final_adapter"], run
    assert run["train"][0] >= 1, run  # the loose pair rules make even the tiny model train

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

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_plumbing(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "400"}
    env.pop("GPU_CHECK_MODEL", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
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
    run = summary["run"]
    assert run["iterations"] == 1 and run["final_adapter"], run
    assert run["train"][0] >= 1, run  # the loose pair rules make even the tiny model train

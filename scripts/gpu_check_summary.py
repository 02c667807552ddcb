"""summary.json of scripts/gpu_check.sh: every step's exit code and seconds (a failed step with the last lines of
its output, so the file alone says why: the log can be lost with the machine), and the key numbers of the steps'
JSON files.

    python scripts/gpu_check_summary.py STEPS_TSV OUT_DIR CPU_ONLY MODEL SECONDS

STEPS_TSV has one line per step (name, exit code or "skipped...", seconds); OUT_DIR holds gpu_check.log (each
step's output between "=== NAME (limit ...)" and "=== NAME: exit ...") and the steps' JSON files.
"""
import json
import sys
from pathlib import Path

TAIL_LINES = 12


def _load(out: Path, name: str):
    p = out / name
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except ValueError as e:
        return {"unreadable": str(e)}


def step_output(log_lines: list[str], name: str) -> list[str]:
    """The output of the last run of step ``name`` in the log (without its "=== " marker lines)."""
    starts = [i for i, ln in enumerate(log_lines) if ln.startswith(f"=== {name} (limit")]
    if not starts:
        return []
    body = []
    for ln in log_lines[starts[-1] + 1:]:
        if ln.startswith(f"=== {name}:"):
            continue
        if ln.startswith("=== "):
            break
        body.append(ln)
    return body


def summarise(steps_file: Path, out: Path, cpu_only: bool, model: str, seconds: int) -> dict:
    steps = []
    for line in steps_file.read_text().splitlines():
        name, rc, secs = line.split("\t")
        steps.append({"step": name, "exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(secs)})
    summary = {"cpu_only": cpu_only, "model": model, "seconds": seconds, "steps": steps,
               "failed": [s["step"] for s in steps if isinstance(s["exit"], int) and s["exit"] != 0]}
    log = out / "gpu_check.log"
    log_lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for s in steps:
        if s["step"] in summary["failed"]:
            s["log_tail"] = [ln[-300:] for ln in step_output(log_lines, s["step"])[-TAIL_LINES:]]
    k = _load(out, "bench_kernels.json")
    if k and "cases" in k:
        summary["kernels"] = [{"case": f"N={c['N']} d={c['d']} V={c['V']} {c['dtype']}",
                               "median_ms": {m: v.get("median_ms") for m, v in c["methods"].items()},
                               "status": {m: v.get("status") for m, v in c["methods"].items()},
                               "ratios": c.get("ratios")} for c in k["cases"]]
    t = _load(out, "bench_train.json")
    if t and "methods" in t:
        keys = ("status", "tokens_per_s", "peak_rss_mb", "peak_cuda_allocated_mb", "initial_loss_all",
                "final_loss_all")
        summary["qlora_dpo"] = {"methods": {m: {key: v.get(key) for key in keys} for m, v in t["methods"].items()},
                                "ratios": t.get("ratios"), "complete": t.get("complete"),
                                "runs": len(t.get("runs", []))}
    r = _load(out, "run_summary.json")
    if r and "iterations" in r:
        summary["run"] = {"iterations": len(r["iterations"]), "final_adapter": r.get("final_adapter"),
                          "heldout_after": (r.get("heldout_after") or {}).get("mean_score"),
                          "memory": r.get("memory"),
                          "train": [(m.get("train") or {}).get("metrics", {}).get("steps") for m in r["iterations"]]}
    return summary


def main(argv: list[str]) -> None:
    steps_file, out, cpu_only, model, seconds = argv
    out = Path(out)
    summary = summarise(Path(steps_file), out, cpu_only == "1", model, int(seconds))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"failed": summary["failed"], "seconds": summary["seconds"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
